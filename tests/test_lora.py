"""LoRA (vlm_jax/models/lora.py): exact at init, merges as W + (alpha / r) A B, trains only the
factors (and `train_also`), resumes, exports merged or not, refuses bad configs clearly."""
import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax import cli
from vlm_jax import defaults
from vlm_jax import models
from vlm_jax.models import lora
from vlm_jax.models.dual_encoder import DualEncoder
from vlm_jax.models.fusion_encoder import FusionEncoder
from vlm_jax.training import optimizer
from vlm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTN_MLP = ('.*attn/(qkv|query|kv|out)_kernel', '.*mlp/fc[12]/kernel')
IMAGES = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
IDS = np.random.RandomState(1).randint(3, 40, (2, 8)).astype(np.int32)
MASK = np.arange(8)[None] < np.array([[8], [5]])


def model_config(name='dual_encoder', scan=False, **lora_values):
  c = defaults.base_config().model
  c.name, c.embed_dim, c.text.vocab_size, c.scan_layers = name, 16, 40, scan
  for tower in (c.image, c.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 16, 2 if scan else 1, 2, 32
  c.fusion.update(name='cross_attention', depth=1, num_heads=2, mlp_dim=32)
  c.decoder.update(unimodal_depth=1, multimodal_depth=1, num_queries=4)
  c.lora.update(lora_values)
  return c


def init(model_cfg):
  model = models.build_model(model_cfg, text_max_len=8)
  init_fn = jax.jit(lambda key: nn.unbox(model.init(key, IMAGES, IDS, MASK)['params']))
  return model, init_fn(jax.random.key(0))


@functools.cache
def built(name='dual_encoder', scan=False, rank=0, targets=(), alpha=8.0):
  """(model, initial params), once per test session (compiling is most of the cost)."""
  return init(model_config(name, scan, rank=rank, targets=targets, alpha=alpha))


_JITTED = {}


def forward(model, params, method=None, *inputs):
  """`model.apply` of `params` on `inputs` (default: IMAGES, IDS, MASK), jitted once."""
  inputs = inputs or (IMAGES, IDS, MASK)
  key = (id(model), method.__name__ if method else None, len(inputs))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda p, *xs: model.apply({'params': p}, *xs, method=method))
  return _JITTED[key](params, *inputs)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def perturbed(params, seed=0):
  """`params` with random B factors (zero at init), so that the updates are not zero."""
  rng = np.random.RandomState(seed)
  factors = {k: (rng.normal(0, 0.1, v.shape).astype(v.dtype) if k.endswith('/b') else v)
             for k, v in flat(params['lora']).items()}
  return {**params, 'lora': traverse_util.unflatten_dict(factors, sep='/')}


@pytest.mark.parametrize('name,scan', [('dual_encoder', False), ('dual_encoder', True),
                                       ('fusion_encoder', False), ('coca', False)])
def test_init_is_the_base_model_bit_for_bit(name, scan):
  base, base_params = built(name, scan)
  model, params = built(name, scan, rank=4, targets=ATTN_MLP)
  assert isinstance(model, type(base)) and type(model) is not type(base)
  assert set(params) == set(base_params) | {'lora'}
  jax.tree.map(np.testing.assert_array_equal, base_params,
               {k: v for k, v in params.items() if k != 'lora'})
  jax.tree.map(np.testing.assert_array_equal, forward(base, base_params),
               forward(model, params))
  factors = flat(params['lora'])
  assert factors and all(not v.any() for k, v in factors.items() if k.endswith('/b'))
  assert all(v.std() > 0 for k, v in factors.items() if k.endswith('/a'))


def test_methods_and_isinstance_dispatch_see_the_merged_kernels():
  base, _ = built('fusion_encoder')
  model, params = built('fusion_encoder', rank=4, targets=ATTN_MLP)
  assert isinstance(model, FusionEncoder)  # objectives.make_loss_fn dispatches on it
  params = perturbed(params)
  merged = lora.merge(params, 8.0 / 4)
  np.testing.assert_array_equal(forward(model, params, model.encode_image, IMAGES),
                                forward(base, merged, base.encode_image, IMAGES))


def test_unwrap_gives_the_base_model_and_merged_params():
  """What decoding loops run: the base class on merged kernels, the same outputs."""
  model, params = built('dual_encoder', rank=4, targets=ATTN_MLP)
  params = perturbed(params)
  base, merged = lora.unwrap(model, params)
  assert type(base) is DualEncoder and 'lora' not in merged
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               forward(base, merged), forward(model, params))
  same_model, same_params = lora.unwrap(base, merged)
  assert same_model is base and same_params is merged


def _by_hand(w, a, b, scale, in_axes):
  """W + scale A B in NumPy, on the kernel viewed as [fan_in, fan_out] (no batch axes)."""
  fan_in = int(np.prod([w.shape[i] for i in in_axes]))
  return w + scale * (a.reshape(fan_in, -1) @ b.reshape(b.shape[0], -1)).reshape(w.shape)


def test_merged_forward_is_w_plus_scaled_ab_by_hand():
  kernels = {'image_encoder/encoder/block_0/mlp/fc1/kernel': (0,),   # Dense [D, F]
             'text_encoder/encoder/block_0/attn/out_kernel': (0, 1)}  # [H, K, D]
  base, _ = built()
  model, params = built(rank=3, alpha=6.0, targets=tuple(kernels))
  params = perturbed(params)
  f = flat(params)
  by_hand = {k: v for k, v in f.items() if not k.startswith('lora/')}
  for path, in_axes in kernels.items():
    a, b = f[f'lora/{path}/a'], f[f'lora/{path}/b']
    assert a.shape[-1] == b.shape[0] == 3
    by_hand[path] = _by_hand(f[path], a, b, 6.0 / 3, in_axes)
  expected = forward(base, traverse_util.unflatten_dict(by_hand, sep='/'))
  got = forward(model, params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, expected)
  unchanged = forward(base, {k: v for k, v in params.items() if k != 'lora'})
  for key in ('image_emb', 'text_emb'):
    assert not np.allclose(got[key], unchanged[key], atol=1e-4)


def test_fused_and_scanned_kernels_get_one_update_per_batch_axis():
  """qkv [L, D, 3, H, K] of scanned layers: per layer and per q/k/v, W += s A[l, :, t] B[l, t]."""
  _, params = built(scan=True, rank=4, targets=ATTN_MLP)
  params = perturbed(params)
  path = 'image_encoder/encoder/blocks/attn/qkv_kernel'
  f, merged = flat(params), flat(lora.merge(params, 2.0))
  a, b, w = f[f'lora/{path}/a'], f[f'lora/{path}/b'], f[path]
  assert w.shape == (2, 16, 3, 2, 8) and a.shape == (2, 16, 3, 4) and b.shape == (2, 3, 4, 2, 8)
  for layer in range(2):
    for t in range(3):
      expected = _by_hand(w[layer, :, t], a[layer, :, t], b[layer, t], 2.0, (0,))
      np.testing.assert_allclose(merged[path][layer, :, t], expected, rtol=1e-6, atol=1e-6)


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='second')(nn.Dense(4, name='first')(x))


def test_trainable_and_total_counts_by_hand():
  spec = lora.LoraSpec(rank=2, alpha=2.0, targets=('first/kernel',))
  model = lora.wrap(_TwoDense(), spec)
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  # base: first 3*4 + 4, second 4*2 + 2 = 26; LoRA on first: A 3*2 + B 2*4 = 14.
  assert optimizer.count_params(params) == (40, 40)
  assert optimizer.count_params(params, lora.frozen_patterns(spec)) == (14, 40)
  also = lora.LoraSpec(2, 2.0, ('first/kernel',), train_also=('second',))
  assert optimizer.count_params(params, lora.frozen_patterns(also)) == (24, 40)
  assert optimizer.count_params(params, ('first', 'lora')) == (10, 40)  # optim.frozen alone


@pytest.mark.parametrize('values,match', [
    (dict(rank=-1), r'model.lora.rank must be an integer >= 0'),
    (dict(rank=2, alpha=0.0), r'model.lora.alpha must be > 0'),
    (dict(rank=2, targets=()), r'needs model.lora.targets.*accepted'),
    (dict(rank=2, targets=('.*atn/qkv_kernel',)),
     r"targets pattern '\.\*atn/qkv_kernel' matches no parameter.*image_encoder.*accepted"),
    (dict(rank=2, targets=('.*attn/qkv_bias',)),
     r"matches '.*attn/qkv_bias'.*not a kernel LoRA takes; accepted: kernels named 'kernel'"),
    (dict(rank=2, targets=('.*attn/.*',)), r'qkv_bias.*not a kernel LoRA takes'),
    (dict(rank=2, targets=('image_encoder/patch_embed/kernel',)),
     r"patch_embed/kernel' \(shape \(8, 8, 3, 16\)\), which is not a kernel LoRA takes"),
    (dict(rank=2, train_also=('imag_proj',)),
     r"train_also pattern 'imag_proj' matches no parameter.*image_proj"),
])
def test_bad_configs_are_one_line_errors(values, match):
  with pytest.raises(ValueError, match=match) as error:
    init(model_config(**values))
  assert '\n' not in str(error.value)


# End to end: a tiny CLIP, then LoRA on both towers' attention projections from its weights.

def tiny_config(data_dir, **train):
  config = cli._load_config_file(os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny')
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  config.eval.update(splits=('test_novel',), max_examples=32, matching=False)
  return config


def lora_config(data_dir, pretrained_dir, **train):
  config = tiny_config(data_dir, num_steps=4, **train)
  config.init.pretrained = pretrained_dir
  config.model.lora.update(rank=2, targets=('.*attn/(qkv|out)_kernel',))
  config.optim.update(learning_rate=1e-2, warmup_steps=0)
  return config


@pytest.fixture(scope='module')
def clip_run(shapes_small_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('clip'))
  state, _ = trainer.train_and_evaluate(tiny_config(shapes_small_dir, num_steps=2), workdir)
  return workdir, jax.device_get(state.params)


@pytest.fixture(scope='module')
def lora_run(clip_run, shapes_small_dir, tmp_path_factory):
  """LoRA from the CLIP, 2 steps, then resumed for 2 more: (workdir, params, log text)."""
  workdir = str(tmp_path_factory.mktemp('lora'))
  config = lambda: lora_config(shapes_small_dir, clip_run[0], max_steps_per_run=2)
  trainer.train_and_evaluate(config(), workdir)
  logger = logging.getLogger()
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  try:
    state, _ = trainer.train_and_evaluate(config(), workdir)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  assert int(state.step) == 4
  return workdir, state, '\n'.join(r.getMessage() for r in records)


@pytest.mark.slow
def test_lora_training_keeps_the_base_bit_identical(clip_run, lora_run):
  (_, clip_params), (workdir, state, log) = clip_run, lora_run
  before, after = flat(clip_params), flat(state.params)
  base = [p for p in after if not p.startswith('lora/')]
  assert set(base) == set(before)
  assert all(np.array_equal(after[p], before[p]) for p in base)
  factors = [p for p in after if p.startswith('lora/')]
  assert len(factors) == 2 * 2 * 2  # (qkv, out) x (image, text) towers x (A, B)
  assert all(after[p].any() for p in factors if p.endswith('/b'))  # B was zero at init
  trainable = sum(after[p].size for p in factors)
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert 2 * trainable <= state_size < 2 * trainable + 16  # Adam moments of the factors only
  counts = json.load(open(os.path.join(workdir, 'params.json')))
  total = sum(v.size for v in after.values())
  assert counts == {'total': total, 'trainable': trainable, 'frozen': total - trainable}
  percent = f'{100 * trainable / total:.2f}%'
  assert f'{total:,} parameters, {trainable:,} trainable ({percent})' in log
  assert 'Resuming from checkpoint at step 2' in log


@pytest.mark.slow
def test_lora_resume_is_bit_identical(clip_run, lora_run, shapes_small_dir, tmp_path):
  _, resumed, _ = lora_run
  state, _ = trainer.train_and_evaluate(lora_config(shapes_small_dir, clip_run[0]),
                                        str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(resumed.params))


@pytest.mark.slow
def test_exports_merge_the_factors_or_keep_them_apart(lora_run, tmp_path):
  from vlm_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import hf, hf_io, workdir  # pylint: disable=g-import-not-at-top
  lora_dir, state, _ = lora_run
  config, merged, tokenizer = workdir.load(lora_dir)
  assert config.model.lora.rank == 0 and 'lora' not in merged
  lora_model = hf.build(workdir.read_config(lora_dir))
  assert isinstance(lora_model, DualEncoder) and lora_model.lora_spec.rank == 2
  ids, mask = tokenizer.encode_batch(['a small red circle', 'a blue square'], 16)
  ours = lora_model.apply({'params': jax.device_get(state.params)}, IMAGES, ids, mask)
  exported = hf.build(config).apply({'params': merged}, IMAGES, ids, mask)
  jax.tree.map(np.testing.assert_array_equal, ours, exported)

  summary = convert_main.export_workdir(lora_dir, str(tmp_path / 'apart'), merge_lora=False)
  assert 'lora.safetensors' in summary
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(tmp_path / 'apart' / 'lora.safetensors'), 'np') as f:
    assert f.metadata()['rank'] == '2' and f.metadata()['alpha'] == '8.0'
    names = set(f.keys())
  assert 'image_encoder/encoder/block_0/attn/qkv_kernel/a' in names and len(names) == 8
  base_qkv = hf_io.read_weights(str(tmp_path / 'apart'))
  unmerged = state.params['image_encoder']['encoder']['block_0']['attn']['qkv_kernel']
  name = 'vision_model.encoder.layers.0.self_attn.q_proj.weight'
  np.testing.assert_array_equal(base_qkv[name], np.asarray(unmerged)[:, 0].reshape(32, -1).T)

  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  convert_main.export_workdir(lora_dir, str(tmp_path / 'merged'))
  theirs = transformers.CLIPModel.from_pretrained(str(tmp_path / 'merged')).eval()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 pixel_values=torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(ours['image_emb'], out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(ours['text_emb'], out.text_embeds.numpy(), atol=1e-5)
