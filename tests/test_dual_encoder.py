"""DualEncoder built from config: outputs, precision, temperature, errors, parameter count."""
import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax import nn as vnn
from vlm_jax.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'joint', 'patch', 'layers', None}
B, SIZE, LEN = 3, 16, 6


def _model_cfg(**model_overrides):
  c = base_config().model
  c.embed_dim = 16
  c.image.update(dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.text.update(dict(vocab_size=40, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.update(model_overrides)
  return c


def _inputs():
  images = jax.random.normal(jax.random.key(0), (B, SIZE, SIZE, 3))
  ids = jax.random.randint(jax.random.key(1), (B, LEN), 3, 40, jnp.int32)
  mask = jnp.arange(LEN)[None] < jnp.array([[6], [4], [2]])
  return images, jnp.where(mask, ids, 0), mask


def _init(model, inputs):
  return nn.unbox(jax.jit(model.init)(jax.random.key(2), *inputs))['params']


def test_outputs_and_methods():
  model = models.build_model(_model_cfg(), text_max_len=LEN)
  inputs = _inputs()
  params = _init(model, inputs)
  out = jax.jit(model.apply)({'params': params}, *inputs)
  assert out['image_emb'].shape == (B, 16) and out['text_emb'].shape == (B, 16)
  for key in out:
    assert out[key].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out['image_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out['text_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out['logit_scale'], 1 / 0.07, rtol=1e-5)
  assert out['logit_bias'] == 0.0 and 'b' not in params
  image_emb = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_image))(
      params, inputs[0])
  text_emb = jax.jit(lambda p, i, m: model.apply({'params': p}, i, m,
                                                 method=model.encode_text))(params, *inputs[1:])
  np.testing.assert_allclose(image_emb, out['image_emb'], atol=1e-6)
  np.testing.assert_allclose(text_emb, out['text_emb'], atol=1e-6)
  assert 'bias' not in params['image_proj'] and 'bias' not in params['text_proj']


def test_bfloat16_keeps_float32_outputs():
  inputs = _inputs()
  f32 = models.build_model(_model_cfg(), text_max_len=LEN)
  bf16 = models.build_model(_model_cfg(dtype='bfloat16'), text_max_len=LEN)
  params = _init(bf16, inputs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = jax.jit(bf16.apply)({'params': params}, *inputs)
  ref = jax.jit(f32.apply)({'params': params}, *inputs)
  for key in out:
    assert out[key].dtype == jnp.float32, key
    np.testing.assert_allclose(out[key], ref[key], atol=0.05, rtol=0.02)
  np.testing.assert_allclose(np.linalg.norm(out['image_emb'], axis=-1), 1.0, rtol=1e-5)
  pooled, tokens = jax.eval_shape(
      lambda p, x: bf16.apply({'params': p}, x, method=lambda m, x: m.image_encoder(x)),
      params, inputs[0])
  assert pooled.dtype == tokens.dtype == jnp.bfloat16  # the towers compute in bf16


def test_temperature_is_clamped():
  model = models.build_model(_model_cfg(), text_max_len=LEN)
  inputs = _inputs()
  params = _init(model, inputs)
  scale = jax.jit(lambda p: model.apply({'params': p}, *inputs)['logit_scale'])
  np.testing.assert_allclose(scale({**params, 't': jnp.float32(10.0)}), 100.0, rtol=1e-5)
  np.testing.assert_allclose(scale({**params, 't': jnp.float32(-3.0)}), 1.0, rtol=1e-6)
  np.testing.assert_allclose(scale({**params, 't': jnp.float32(1.0)}), math.e, rtol=1e-6)


def test_learned_bias():
  cfg = _model_cfg()
  cfg.temperature.update(dict(init=math.log(10.0), bias_init=-10.0, learn_bias=True))
  model = models.build_model(cfg, text_max_len=LEN)
  inputs = _inputs()
  params = _init(model, inputs)
  out = jax.jit(model.apply)({'params': params}, *inputs)
  assert params['b'] == -10.0
  np.testing.assert_allclose(out['logit_bias'], -10.0)
  np.testing.assert_allclose(out['logit_scale'], 10.0, rtol=1e-5)
  cfg.temperature.learn_bias = False
  model = models.build_model(cfg, text_max_len=LEN)
  out = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  assert 'b' not in out['params']


def test_scan_model_matches_loop_model():
  inputs = _inputs()
  loop = models.build_model(_model_cfg(), text_max_len=LEN)
  scan = models.build_model(_model_cfg(scan_layers=True, remat='full'), text_max_len=LEN)
  params = _init(loop, inputs)
  mapped = dict(params)
  for tower in ('image_encoder', 'text_encoder'):
    mapped[tower] = {**params[tower],
                     'encoder': vnn.stack_layer_params(params[tower]['encoder'], 2)}
  out = jax.jit(scan.apply)({'params': mapped}, *inputs)
  ref = jax.jit(loop.apply)({'params': params}, *inputs)
  for key in out:
    np.testing.assert_allclose(out[key], ref[key], atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_logical_axis_names(scan_layers):
  model = models.build_model(_model_cfg(scan_layers=scan_layers, image=dict(pool='map')),
                             text_max_len=LEN)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_inputs())['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    assert set(v.names) <= ALLOWED_AXES and len(v.names) == v.value.ndim, v.names


@pytest.mark.parametrize('overrides,match', [
    (dict(name='vqvae'), "model.name 'vqvae'; accepted: dual_encoder"),
    (dict(image=dict(name='resnet9')), "model.image.name 'resnet9'; accepted: vit"),
    (dict(image=dict(pool='max')), 'model.image.pool .*accepted: cls, map, gap'),
    (dict(image=dict(posemb='rope')), 'model.image.posemb .*accepted: learn, sincos2d'),
    (dict(text=dict(pool='max')), 'model.text.pool .*accepted: eot, cls, mean, last'),
    (dict(text=dict(name='lstm')), 'model.text.name .*accepted: transformer'),
    (dict(remat='some'), 'model.remat .*accepted: none, full, dots_saveable'),
    (dict(dtype='fp8'), 'model.dtype .*accepted: float32, bfloat16, float16'),
    (dict(text=dict(vocab_size=0)), 'vocab_size is 0'),
])
def test_build_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(_model_cfg(**overrides), text_max_len=LEN)


def _count_params(model, size, length):
  def init(rng):
    return model.init(rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32),
                      jnp.ones((1, length), bool))
  abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def _expected_clip_count(image_width=768, image_depth=12, image_mlp=3072, patch=16, size=224,
                         text_width=512, text_depth=12, text_mlp=2048, vocab=49408,
                         length=77, embed=512):
  """OpenAI CLIP's parameter count, written out tensor by tensor."""
  def block(d, f):
    ln = 2 * d
    attn = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    return 2 * ln + attn + mlp

  d = image_width
  image = (3 * patch * patch * d + d + ((size // patch) ** 2 + 1) * d + 2 * d
           + image_depth * block(d, image_mlp) + 2 * d + d * embed)
  d = text_width
  text = vocab * d + length * d + text_depth * block(d, text_mlp) + 2 * d + d * embed
  return image + text + 1  # + logit_scale


def test_clip_vit_b16_parameter_count():
  spec = importlib.util.spec_from_file_location(
      'clip_vit_b16', os.path.join(REPO, 'configs', 'clip_vit_b16.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  assert _expected_clip_count() == 149_620_737
  assert _count_params(model, config.data.image_size, config.data.max_text_len) == 149_620_737
