"""Building blocks: attention against NumPy, masks, pooling, scan and remat equivalence."""
from math import erf, sqrt

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import nn as vnn

ALLOWED_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'joint', 'patch', 'layers', None}


def _np_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _np_attention(q, k, v, mask):
  """q [B, Lq, H, K], k/v [B, Lk, H, K], mask [B, 1, Lq, Lk] -> [B, Lq, H, K]."""
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])  # [Lq, Lk]
      logits = np.where(mask[b, 0], logits, -1e30)
      out[b, :, h] = _np_softmax(logits) @ v[b, :, h]
  return out


def _random_params(variables, seed=0):
  """Perturbs every leaf (random init leaves biases at zero and hides mistakes)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: x + 0.1 * rng.randn(*x.shape).astype(np.float32), variables)


def test_masks():
  np.testing.assert_array_equal(vnn.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
  key_mask = jnp.array([[True, True, False], [True, False, False]])
  pad = vnn.padding_mask(key_mask)
  assert pad.shape == (2, 1, 1, 3) and pad.dtype == bool
  both = vnn.combine_masks(vnn.causal_mask(3), pad, None)
  assert both.shape == (2, 1, 3, 3)
  np.testing.assert_array_equal(both[1, 0], [[1, 0, 0], [1, 0, 0], [1, 0, 0]])
  assert vnn.combine_masks(None, None) is None
  assert vnn.padding_mask(key_mask, key_mask).shape == (2, 1, 3, 3)


def test_self_attention_matches_numpy():
  b, l, d, h = 2, 5, 12, 3
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (b, 1, l, l))
  mask = mask.at[..., 0].set(True)  # every query sees at least one key
  module = vnn.MultiHeadAttention(num_heads=h)
  params = _random_params(nn.unbox(jax.jit(module.init)(jax.random.key(2), x)))['params']
  y = jax.jit(module.apply)({'params': params}, x, mask=mask)
  p = jax.tree.map(np.asarray, params)
  xn = np.asarray(x)
  qkv = np.einsum('bld,dthk->blthk', xn, p['qkv_kernel']) + p['qkv_bias']
  out = _np_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], np.asarray(mask))
  expected = np.einsum('blhk,hkd->bld', out, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_numpy():
  b, lq, lk, d, dkv, h = 2, 3, 4, 8, 6, 2
  xq = jax.random.normal(jax.random.key(0), (b, lq, d))
  xkv = jax.random.normal(jax.random.key(1), (b, lk, dkv))
  key_mask = jnp.array([[True, True, True, False], [True, False, True, True]])
  mask = vnn.padding_mask(key_mask)
  module = vnn.MultiHeadAttention(num_heads=h)
  params = _random_params(nn.unbox(jax.jit(module.init)(jax.random.key(2), xq, xkv)))['params']
  assert params['query_kernel'].shape == (d, h, d // h)
  assert params['kv_kernel'].shape == (dkv, 2, h, d // h)
  y = jax.jit(module.apply)({'params': params}, xq, xkv, mask=mask)
  assert y.shape == (b, lq, d)
  p = jax.tree.map(np.asarray, params)
  q = np.einsum('bld,dhk->blhk', np.asarray(xq), p['query_kernel']) + p['query_bias']
  kv = np.einsum('bld,dthk->blthk', np.asarray(xkv), p['kv_kernel']) + p['kv_bias']
  full = np.broadcast_to(np.asarray(mask), (b, 1, lq, lk))
  out = _np_attention(q, kv[:, :, 0], kv[:, :, 1], full)
  expected = np.einsum('blhk,hkd->bld', out, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_head_major_attention_matches_jax_with_mask_and_bias():
  b, h, lq, lk, k = 2, 3, 4, 5, 8
  keys = jax.random.split(jax.random.key(0), 5)
  q, key, value = (jax.random.normal(r, (b, h, length, k))
                   for r, length in zip(keys[:3], (lq, lk, lk)))
  bias = jax.random.normal(keys[3], (1, h, lq, lk))
  mask = jax.random.bernoulli(keys[4], 0.6, (b, 1, lq, lk)).at[..., 0].set(True)
  out = vnn.attention.head_major_attention(q, key, value, mask, bias)
  swap = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, L, K] <-> [B, L, H, K]
  expected = jax.nn.dot_product_attention(swap(q), swap(key), swap(value), bias=bias,
                                          mask=mask)
  np.testing.assert_allclose(out, swap(expected), atol=1e-5, rtol=1e-5)


def test_dense_matches_numpy_on_any_leading_axes():
  x = np.random.RandomState(0).randn(2, 3, 5, 4).astype(np.float32)
  layer = vnn.transformer.Dense(6)
  params = _random_params(layer.init(jax.random.key(0), x[0, 0]))
  kernel, bias = (np.asarray(params['params'][n]) for n in ('kernel', 'bias'))
  for inputs in (x, x[0], x[0, 0], x[0, 0, 0]):  # [2, 3, 5, 4] ... [4]
    out = layer.apply(params, inputs)
    assert out.shape == inputs.shape[:-1] + (6,)
    np.testing.assert_allclose(out, inputs @ kernel + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_low_precision_products_and_their_gradients_match_float32(dtype):
  rng = np.random.RandomState(0)
  x, w, b = rng.randn(6, 8), rng.randn(8, 3), rng.randn(3)
  q, k = rng.randn(2, 3, 5, 4), rng.randn(2, 3, 7, 4)
  cases = [  # (ours, the float32 reference (jax's own gradients), inputs)
      (vnn.ops.affine, lambda x, w, b: x @ w + b, (x, w, b)),
      (lambda q, k: vnn.ops.einsum('bhqk,bhsk->bhqs', q, k, out_dtype=jnp.float32),
       lambda q, k: jnp.einsum('bhqk,bhsk->bhqs', q, k), (q, k))]
  tol = 1e-5 if dtype == jnp.float32 else 3e-2  # bf16 inputs: 8 bits of mantissa
  for ours, reference, inputs in cases:
    inputs32 = [jnp.asarray(a, jnp.float32) for a in inputs]
    low = [a.astype(dtype) for a in inputs32]
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))
    out, grads = jax.value_and_grad(loss(ours), range(len(low)))(*low)
    ref, ref_grads = jax.value_and_grad(loss(reference), range(len(low)))(*inputs32)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * abs(float(ref)))
    for g, r, a in zip(grads, ref_grads, low):
      assert g.dtype == a.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=tol, atol=tol * np.abs(r).max())
  with pytest.raises(ValueError, match='summed out alone'):
    vnn.ops.einsum('nk,m->n', low[0], low[0][0, :1])



@pytest.mark.parametrize('k, m', [(8, 3), (3, 8), (5, 5)])   # x or g transposed, or a tie
@pytest.mark.parametrize('with_bias', [True, False])
def test_float32_affine_gradients_match_numpy(k, m, with_bias):
  """The float32 CPU path (gradient products on row-major copies) against the hand-derived
  gradients of sum(sin(x w + b))."""
  rng = np.random.RandomState(1)
  x, w, b = (rng.randn(*s).astype(np.float32) for s in ((7, k), (k, m), (m,)))
  bias = b if with_bias else None
  loss = lambda x, w, bias: jnp.sum(jnp.sin(vnn.ops.affine(x, w, bias)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, bias)
  dy = np.cos(x @ w + (b if with_bias else 0))
  expected = (dy @ w.T, x.T @ dy, dy.sum(0) if with_bias else None)
  for got, want in zip(grads, expected):
    if want is None:
      assert got is None
    else:
      assert got.shape == want.shape and got.dtype == jnp.float32
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec, shapes', [
    ('bhqk,bhsk->bhqs', ((2, 3, 5, 4), (2, 3, 7, 4))),   # attention scores
    ('bhqs,bhsk->bhqk', ((2, 3, 5, 7), (2, 3, 7, 4))),   # attention-weighted values
    ('bqhk,bshk->bhqs', ((2, 5, 3, 4), (2, 7, 3, 4))),   # token-major operands
    ('nk,km->mn', ((9, 4), (4, 6))),                     # a transposed output
    ('bi,bj->bij', ((3, 4), (3, 5))),                    # nothing contracted
])
def test_float32_einsum_gradients_match_numpy(spec, shapes):
  rng = np.random.RandomState(2)
  a, b = (rng.randn(*s).astype(np.float32) for s in shapes)
  loss = lambda a, b: jnp.sum(jnp.sin(vnn.ops.einsum(spec, a, b)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  dy = np.cos(np.einsum(spec, a, b))
  expected = (np.einsum(f'{out},{sb}->{sa}', dy, b), np.einsum(f'{sa},{out}->{sb}', a, dy))
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_row_major_plan():
  plan = vnn.ops._row_major_plan  # pylint: disable=protected-access
  # Weight gradient x^T g of x [N, K], g [N, M]: copy x when K <= M ...
  assert plan('nk,nm->km', dict(n=1000, k=64, m=256)) == ('ab', 'kn', 'nm', 'km')
  # ... else copy g and transpose the [M, K] product (a copy of weight size).
  assert plan('nk,nm->km', dict(n=1000, k=256, m=64)) == ('ba', 'mn', 'nk', 'mk')
  # Key gradient of attention: the score gradient is copied, not the queries and the output.
  assert plan('bhqs,bhqk->bhsk', dict(b=2, h=3, q=5, s=7, k=64)) == (
      'ab', 'bhsq', 'bhqk', 'bhsk')
  # Already row-major (a transposed rhs included): nothing moves.
  assert plan('nm,km->nk', dict(n=1000, k=64, m=256)) == ('ab', 'nm', 'km', 'nk')
  assert plan('bhqs,bhsk->bhqk', dict(b=2, h=3, q=5, s=7, k=4)) == (
      'ab', 'bhqs', 'bhsk', 'bhqk')


def test_activations():
  x = jnp.linspace(-4.0, 4.0, 9)
  np.testing.assert_allclose(vnn.quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)
  exact = [v * 0.5 * (1 + erf(v / sqrt(2))) for v in np.asarray(x)]
  np.testing.assert_allclose(vnn.activation_fn('gelu')(x), exact, atol=1e-6)
  with pytest.raises(ValueError, match='accepted: gelu, quick_gelu'):
    vnn.activation_fn('relu6')


def _encoder(**kw):
  return vnn.Encoder(**{'depth': 2, 'num_heads': 2, 'mlp_dim': 32, **kw})


def test_causal_mask_blocks_future_tokens():
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  module = _encoder()
  variables = _random_params(nn.unbox(jax.jit(module.init)(jax.random.key(1), x)))
  mask = vnn.causal_mask(6)
  apply = jax.jit(module.apply)
  y = apply(variables, x, mask)
  i = 2
  x2 = x.at[:, i + 1:].add(jax.random.normal(jax.random.key(3), (2, 6 - i - 1, 16)))
  y2 = apply(variables, x2, mask)
  np.testing.assert_allclose(y2[:, :i + 1], y[:, :i + 1], atol=1e-6)
  assert not np.allclose(y2[:, i + 1:], y[:, i + 1:])


def test_padding_mask_hides_padding_tokens():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  real = jnp.array([[True] * 3 + [False] * 2, [True] * 5])
  module = _encoder()
  variables = jax.jit(module.init)(jax.random.key(1), x)
  mask = vnn.padding_mask(real)
  apply = jax.jit(module.apply)
  y = apply(variables, x, mask)
  x2 = jnp.where(real[..., None], x, 5.0 * x[:, ::-1])
  y2 = apply(variables, x2, mask)
  np.testing.assert_allclose(y2[0, :3], y[0, :3], atol=1e-6)
  np.testing.assert_allclose(y2[1], y[1], atol=1e-6)


def test_pooling_matches_numpy():
  x = np.random.RandomState(0).randn(3, 5, 4).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(vnn.eot_index(mask), [2, 4, 0])
  expected = np.stack([x[b, mask[b].sum() - 1] for b in range(3)])
  np.testing.assert_array_equal(vnn.eot_pool(jnp.asarray(x), jnp.asarray(mask)), expected)
  np.testing.assert_array_equal(vnn.cls_pool(jnp.asarray(x)), x[:, 0])
  mean = np.stack([x[b, mask[b]].mean(0) for b in range(3)])
  np.testing.assert_allclose(vnn.mean_pool(jnp.asarray(x), jnp.asarray(mask)), mean,
                             rtol=1e-6)


def test_map_head():
  x = jax.random.normal(jax.random.key(0), (3, 7, 16))
  head = vnn.MAPHead(num_heads=2, mlp_dim=32)
  variables = jax.jit(head.init)(jax.random.key(1), x)
  apply = jax.jit(head.apply)
  assert apply(variables, x).shape == (3, 16)
  mask = jnp.arange(7)[None] < jnp.array([[7], [4], [1]])  # [3, 7]
  ym = apply(variables, x, mask)
  x2 = jnp.where(mask[..., None], x, 100.0)
  np.testing.assert_allclose(apply(variables, x2, mask), ym, atol=1e-5)


def test_sincos_posemb():
  pe = vnn.posemb_sincos_2d(2, 3, 8)
  assert pe.shape == (1, 6, 8)
  np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
  with pytest.raises(ValueError, match='divisible by 4'):
    vnn.posemb_sincos_2d(2, 2, 6)


def _loss(module, params, x, mask):
  return jnp.sum(module.apply({'params': params}, x, mask) ** 2)


def test_scan_matches_loop():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = vnn.causal_mask(5)
  loop, scan = _encoder(depth=3), _encoder(depth=3, scan_layers=True)
  params = _random_params(nn.unbox(jax.jit(loop.init)(jax.random.key(1), x, mask)))['params']
  stacked = vnn.stack_layer_params(params, 3)
  scan_vars = jax.eval_shape(scan.init, jax.random.key(1), x, mask)
  scan_shapes = jax.tree.map(jnp.shape, nn.unbox(scan_vars))
  assert jax.tree.map(jnp.shape, stacked) == scan_shapes['params']
  np.testing.assert_allclose(jax.jit(scan.apply)({'params': stacked}, x, mask),
                             jax.jit(loop.apply)({'params': params}, x, mask), atol=1e-5)
  unstacked = vnn.unstack_layer_params(stacked)
  assert jax.tree.all(jax.tree.map(np.array_equal, unstacked, params))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_variants_agree(scan_layers):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = vnn.causal_mask(5)
  base = _encoder(scan_layers=scan_layers)
  params = _random_params(nn.unbox(jax.jit(base.init)(jax.random.key(1), x, mask)))['params']
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: _loss(base, p, x, mask)))(params)
  for remat in ('full', 'dots_saveable'):
    module = _encoder(scan_layers=scan_layers, remat=remat)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _loss(module, p, x, mask)))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 grads, ref_grads)


def test_unknown_remat_is_an_error():
  with pytest.raises(ValueError, match="accepted: none, full, dots_saveable"):
    _encoder(remat='some').init(jax.random.key(0), jnp.zeros((1, 2, 16)))


def test_dropout_needs_rng_and_changes_output():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  module = _encoder(dropout_rate=0.5, scan_layers=True)
  variables = jax.jit(module.init)(jax.random.key(1), x)
  y = jax.jit(module.apply)(variables, x)
  yd = jax.jit(module.apply, static_argnums=3)(variables, x, None, False,
                                                rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(y, yd)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_logical_axis_names(scan_layers):
  x = jnp.zeros((1, 4, 16))
  module = _encoder(scan_layers=scan_layers)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    assert set(v.names) <= ALLOWED_AXES and len(v.names) == v.value.ndim
    assert (v.names[0] == 'layers') == scan_layers


def test_cudnn_attention_falls_back_and_says_why_once(monkeypatch, caplog):
  """Where cuDNN declines (here: a GPU backend faked, and a refusal like JAX's), the einsum
  path runs and the reason is logged once per distinct shapes and message."""
  def refuse(*args, **kwargs):
    raise ValueError('Unsupported sequence length 197')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax.nn, 'dot_product_attention', refuse)
  vnn.attention._log_declined.cache_clear()  # pylint: disable=protected-access
  q = jnp.ones((2, 5, 3, 8), jnp.bfloat16)
  with caplog.at_level('WARNING'):
    for _ in range(3):
      assert vnn.attention.cudnn_attention(q, q, q) is None
  declined = [r.getMessage() for r in caplog.records if 'cuDNN fused attention' in r.getMessage()]
  assert len(declined) == 1
  assert 'q (2, 5, 3, 8)' in declined[0] and 'Unsupported sequence length 197' in declined[0]
  assert vnn.attention.cudnn_attention(q.astype(jnp.float32), q, q) is None  # f32: not tried


def test_self_attention_query_rows_match_numpy():
  """Queries of chosen rows only: the full attention's rows, from the NumPy formula."""
  b, l, d, h = 2, 5, 12, 3
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (b, 1, l, l)).at[..., 0].set(True)
  rows = jnp.array([[4, 1], [0, 4]])
  module = vnn.MultiHeadAttention(num_heads=h)
  params = _random_params(nn.unbox(jax.jit(module.init)(jax.random.key(2), x)))['params']
  row_mask = vnn.attention.select_mask_rows(mask, rows)
  assert row_mask.shape == (b, 1, 2, l)
  y = jax.jit(module.apply)({'params': params}, x, mask=row_mask, query_rows=rows)
  p = jax.tree.map(np.asarray, params)
  qkv = np.einsum('bld,dthk->blthk', np.asarray(x), p['qkv_kernel']) + p['qkv_bias']
  out = _np_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], np.asarray(mask))
  full = np.einsum('blhk,hkd->bld', out, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(y, full[np.arange(b)[:, None], np.asarray(rows)], atol=1e-5,
                             rtol=1e-5)
  with pytest.raises(ValueError, match='self-attention only'):
    module.apply({'params': params}, x, x, query_rows=rows)


@pytest.mark.parametrize('kw', [dict(), dict(remat='full'), dict(norm_first=False),
                                dict(scan_layers=True)])
def test_encoder_rows_equal_selected_full_rows_and_gradients(kw):
  """`rows` computes the last block for those rows only: the same outputs and gradients."""
  x = jax.random.normal(jax.random.key(0), (3, 6, 16))
  mask = vnn.combine_masks(vnn.causal_mask(6),
                           vnn.padding_mask(jnp.arange(6)[None] < jnp.array([[6], [3], [1]])))
  rows = jnp.array([[5], [2], [0]])
  module = _encoder(**kw)
  params = _random_params(nn.unbox(jax.jit(module.init)(jax.random.key(1), x, mask)))['params']
  pick = lambda y: y[jnp.arange(3)[:, None], rows]  # [B, 1, D]
  full_loss = lambda p: jnp.sum(jnp.sin(pick(module.apply({'params': p}, x, mask))))
  rows_loss = lambda p: jnp.sum(jnp.sin(module.apply({'params': p}, x, mask, True, rows)))
  assert module.apply({'params': params}, x, mask, True, rows).shape == (3, 1, 16)
  full, full_grads = jax.jit(jax.value_and_grad(full_loss))(params)
  part, part_grads = jax.jit(jax.value_and_grad(rows_loss))(params)
  np.testing.assert_allclose(part, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               part_grads, full_grads)


def test_encoder_of_no_blocks_selects_rows():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  rows = jnp.array([[3], [1]])
  np.testing.assert_array_equal(_encoder(depth=0).apply({}, x, None, True, rows),
                                x[jnp.arange(2)[:, None], rows])
