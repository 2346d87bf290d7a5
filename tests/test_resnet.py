"""The ResNet image tower: shapes, attention pooling against NumPy, per-example GroupNorm,
readable errors, and an end-to-end run of configs/clip_resnet_shapes.py:tiny."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import cli
from vlm_jax import models
from vlm_jax.defaults import base_config
from vlm_jax.encoders import ResNet
from vlm_jax.encoders.resnet import AttentionPool
from vlm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(arg: str = ''):
  """configs/clip_resnet_shapes.py[:arg] as the command line loads it."""
  return cli._load_config_file(  # pylint: disable=protected-access
      os.path.join(REPO, 'configs', 'clip_resnet_shapes.py') + (f':{arg}' if arg else ''))


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _resnet(**kw):
  return ResNet(**{'layers': (1, 1, 1), 'width': 8, 'num_heads': 2, 'output_dim': 24, **kw})


@pytest.mark.parametrize('kw,size,grid,channels', [
    (dict(), (32, 32), (2, 2), 4 * 8 * 4),            # 3 stages: stride 16
    (dict(), (16, 48), (1, 3), 4 * 8 * 4),            # non-square
    (dict(layers=(1, 1)), (24, 40), (3, 5), 4 * 8 * 2),  # 2 stages: stride 8
    (dict(layers=(2, 1, 1, 1), width=16, num_heads=4), (64, 64), (2, 2), 4 * 16 * 8),
    (dict(remat='full'), (32, 32), (2, 2), 4 * 8 * 4),
])
def test_resnet_shapes(kw, size, grid, channels):
  images = jnp.zeros((3, *size, 3))
  module = _resnet(**kw)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  pooled, tokens = jax.eval_shape(module.apply, variables, images)
  assert pooled.shape == (3, 24)
  assert tokens.shape == (3, grid[0] * grid[1], channels)
  params = nn.unbox(variables)['params']
  assert params['attn_pool']['pos_embed'].shape == (grid[0] * grid[1] + 1, channels)
  layers = kw.get('layers', (1, 1, 1))
  blocks = {k for k in params if k.startswith('stage')}
  assert blocks == {f'stage{s}_block{b}' for s, n in enumerate(layers) for b in range(n)}


def test_resnet_runs_and_blocks_start_as_identity_branches():
  images = _normal(0, (2, 16, 16, 3))
  module = _resnet(layers=(1, 1))
  variables = jax.jit(module.init)(jax.random.key(1), images)
  pooled, tokens = jax.jit(module.apply)(variables, images)
  assert np.isfinite(np.asarray(pooled)).all() and np.isfinite(np.asarray(tokens)).all()
  params = nn.unbox(variables)['params']
  # CLIP's init: the last norm of each residual branch starts at zero scale.
  np.testing.assert_array_equal(params['stage1_block0']['norm3']['scale'], 0.0)
  np.testing.assert_array_equal(params['stage1_block0']['norm2']['scale'], 1.0)
  assert 'bias' not in params['stem_conv1']  # convolutions have no bias


def test_resnet_parameters_have_logical_axis_names():
  variables = jax.eval_shape(_resnet().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  specs = jax.tree.leaves(nn.get_partition_spec(variables['params']),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(jax.tree.leaves(nn.unbox(variables)['params']))
  kernel = variables['params']['stage0_block0']['conv2']['kernel']
  assert kernel.names == (None, None, None, 'embed')


def test_groupnorm_is_per_example():
  """Unlike BatchNorm, changing one example of the batch leaves the others' outputs alone."""
  images = _normal(0, (3, 16, 16, 3))
  module = _resnet(layers=(1, 1))
  variables = jax.jit(module.init)(jax.random.key(1), images)
  apply = jax.jit(module.apply)
  pooled, _ = apply(variables, images)
  others = _normal(2, (2, 16, 16, 3))
  pooled2, _ = apply(variables, np.concatenate([images[:1], others]))
  np.testing.assert_allclose(pooled2[0], pooled[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(pooled2[1], pooled[1], atol=1e-3)


def _attention_pool_reference(x: np.ndarray, params: dict, heads: int) -> np.ndarray:
  """CLIP's attention pooling in float64 NumPy: x [B, N, C] -> [B, out]."""
  x = x.astype(np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + p['pos_embed']
  a = p['attn']
  head_dim = a['query_kernel'].shape[-1]
  assert a['query_kernel'].shape[1] == heads
  outputs = []
  for h in range(heads):
    q = tokens[:, 0] @ a['query_kernel'][:, h] + a['query_bias'][h]            # [B, K]
    k = tokens @ a['kv_kernel'][:, 0, h] + a['kv_bias'][0, h]                  # [B, N+1, K]
    v = tokens @ a['kv_kernel'][:, 1, h] + a['kv_bias'][1, h]
    logits = np.einsum('bk,bnk->bn', q, k) / np.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    outputs.append(np.einsum('bn,bnk->bk', weights, v) @ a['out_kernel'][h])  # [B, out]
  return sum(outputs) + a['out_bias']


def test_attention_pool_matches_numpy_reference():
  x = _normal(0, (3, 6, 16))
  pool = AttentionPool(num_heads=4, out_features=10)
  # Random values for every parameter (no zero biases to hide a wrong index).
  shapes = nn.unbox(jax.eval_shape(pool.init, jax.random.key(1), x))['params']
  leaves, tree = jax.tree.flatten(shapes)
  params = jax.tree.unflatten(tree, [0.3 * _normal(i + 1, leaf.shape)
                                     for i, leaf in enumerate(leaves)])
  got = jax.jit(pool.apply)({'params': params}, x)
  assert got.shape == (3, 10)
  np.testing.assert_allclose(got, _attention_pool_reference(np.asarray(x), params, 4),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [(30, 32), (32, 8)])
def test_resnet_bad_image_size(size):
  with pytest.raises(ValueError, match='must be a multiple of the total stride 16'):
    jax.eval_shape(_resnet().init, jax.random.key(0), jnp.zeros((1, *size, 3)))


def test_resnet_bad_options():
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r'\[batch, height, width, 3\]'):
    jax.eval_shape(_resnet().init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match='not divisible by model.image.num_heads=3'):
    jax.eval_shape(_resnet(num_heads=3).init, jax.random.key(0), images)
  with pytest.raises(ValueError, match='at least one stage'):
    jax.eval_shape(_resnet(layers=()).init, jax.random.key(0), images)


def _resnet_model_cfg(**image):
  cfg = base_config().model
  cfg.text.vocab_size = 50
  cfg.image.update(name='resnet', width=8, num_heads=2, proj=False, **image)
  return cfg


def test_build_resnet_from_config():
  cfg = _resnet_model_cfg(layers=(1, 1))
  tower = models.build_image_tower(cfg)
  assert isinstance(tower, ResNet) and tower.output_dim == cfg.embed_dim
  model = models.build_model(cfg, text_max_len=8)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                             jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool))
  assert 'image_proj' not in variables['params']
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)),
                       jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool))
  assert out['image_emb'].shape == out['text_emb'].shape == (2, cfg.embed_dim)


def test_build_resnet_rejects_batchnorm_and_patch_dropout():
  with pytest.raises(ValueError, match="Unknown model.image.norm 'batch'; accepted: group"):
    models.build_image_tower(_resnet_model_cfg(norm='batch'))
  with pytest.raises(ValueError, match='patch_dropout'):
    models.build_image_tower(_resnet_model_cfg(patch_dropout=0.5))


def test_clip_resnet_config_loads():
  for arg in ('', 'tiny'):
    config = _load(arg)
    assert config.model.image.name == 'resnet' and not config.model.image.proj
  with pytest.raises(ValueError, match='accepted'):
    _load('huge')


@pytest.mark.slow
def test_tiny_resnet_trains_resumes_and_evaluates(shapes_small_dir, tmp_path):
  """Data parallel over the 8 fake CPU devices (jit mode); evaluation after a restart
  restores the checkpoint (the model config, with its `layers` tuple, must match)."""
  config = _load('tiny')
  config.data.data_dir = str(shapes_small_dir)
  state, results = trainer.train_and_evaluate(config, str(tmp_path))
  assert jax.device_count() == 8 and int(state.step) == config.train.num_steps
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  losses = [row['train/loss'] for row in rows if 'train/loss' in row]
  assert len(losses) == 3 and np.isfinite(losses).all()
  for split in ('test', 'test_novel'):
    assert 0.0 <= results[f'eval/{split}/zeroshot_top1'] <= 1.0
  # A second run finds the finished checkpoint and only evaluates, with the same results.
  config = _load('tiny')
  config.data.data_dir = str(shapes_small_dir)
  _, again = trainer.train_and_evaluate(config, str(tmp_path))
  assert again == pytest.approx(results)
