"""Multi-head attention (see `MultiHeadAttention.__call__` for its layouts) and its masks.

Masks are boolean, True where a query may attend to a key, shaped [B | 1, 1, Lq, Lk] so that
they broadcast over heads; `combine_masks` ANDs any number of them (None is skipped).
"""
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import ops

Dtype = Any
Initializer = nn.initializers.Initializer

# Fan-in is the model width, fan-out the heads x head dim; the fused axis (q, k, v) is a
# batch axis, so a fused kernel initialises exactly like three separate ones.
QKV_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=0,
                                            out_axis=(-2, -1), batch_axis=(1,))
Q_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=0,
                                          out_axis=(-2, -1))
OUT_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1),
                                            out_axis=-1)


def causal_mask(length: int) -> jax.Array:
  """[1, 1, L, L] bool: query i sees keys j <= i."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(key_mask: jax.Array, query_mask: jax.Array | None = None) -> jax.Array:
  """[B, 1, Lq | 1, Lk] bool from per-token validity masks.

  Args:
    key_mask: [B, Lk] bool, True for real (non-padding) keys.
    query_mask: optional [B, Lq] bool; when given, padding queries attend to nothing (their
      outputs are then meaningless and should be ignored downstream).
  """
  mask = key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, Lk]
  if query_mask is not None:
    mask = mask & query_mask.astype(bool)[:, None, :, None]  # [B, 1, Lq, Lk]
  return mask


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of broadcastable boolean masks; None entries are ignored."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0].astype(bool)
  for m in masks[1:]:
    out = out & m.astype(bool)
  return out


def select_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """The rows `rows` [B, Q] int of each example of x [B, L, ...]: [B, Q, ...]."""
  index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def select_mask_rows(mask: jax.Array | None, rows: jax.Array) -> jax.Array | None:
  """The query rows `rows` [B, Q] of a mask [B | 1, 1, Lq | 1, Lk]: [B, 1, Q | 1, Lk]."""
  if mask is None or mask.shape[2] == 1:
    return mask
  mask = jnp.broadcast_to(mask, (rows.shape[0],) + mask.shape[1:])
  return jnp.take_along_axis(mask, rows[:, None, :, None], axis=2)


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array | None = None,
                         bias: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(K) + bias, masked) v, the scores and softmax in float32: the
  arithmetic of `jax.nn.dot_product_attention`, in the head-major layout.

  Args:
    q: [B, H, Lq, K]; k, v: [B, H, Lk, K].
    mask: bool, broadcastable to [B, H, Lq, Lk]; True = attend.
    bias: additive logits bias, broadcastable to [B, H, Lq, Lk].

  Returns:
    [B, H, Lq, K].
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = ops.einsum('bhqk,bhsk->bhqs', q * scale, k, out_dtype=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask.astype(bool), logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return ops.einsum('bhqs,bhsk->bhqk', weights, v)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                    bias: jax.Array | None = None) -> jax.Array | None:
  """cuDNN's fused (flash) attention of [B, L, H, K] inputs, [B, Lq, H, K], or None where it
  does not apply: off GPU, outside bf16/f16, or on shapes that cuDNN rejects (JAX checks them
  when tracing: e.g. a mask or bias on odd sequence lengths in training, head dims that are
  not a multiple of 8). Same arithmetic as `head_major_attention`: float32 scores and
  softmax; it never materialises the [B, H, Lq, Lk] scores."""
  if (jax.default_backend() != 'gpu' or q.dtype not in ops.LOW_PRECISION
      or not q.dtype == k.dtype == v.dtype):
    return None
  try:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation='cudnn')
  except (NotImplementedError, ValueError, RuntimeError) as e:
    shape = lambda x: None if x is None else tuple(x.shape)
    _log_declined(f'q {shape(q)}, k {shape(k)}, mask {shape(mask)}, bias {shape(bias)}, '
                  f'{q.dtype}: {type(e).__name__}: {e}')
    return None


@functools.cache
def _log_declined(reason: str) -> None:
  """Logs, once per distinct reason, why cuDNN's fused attention did not apply."""
  logging.warning('cuDNN fused attention declined, XLA attention used instead: %s', reason)


def token_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None) -> jax.Array:
  """`head_major_attention` of [B, L, H, K] inputs (the projections' and the decoding caches'
  layout), returning [B, Lq, H, K]; on GPU `cudnn_attention` where it applies."""
  fused = cudnn_attention(q, k, v, mask, bias)
  return einsum_token_major_attention(q, k, v, mask, bias) if fused is None else fused


def einsum_token_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                 mask: jax.Array | None = None,
                                 bias: jax.Array | None = None) -> jax.Array:
  """`head_major_attention` of [B, L, H, K] inputs on every backend, [B, Lq, H, K]."""
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  return heads_first(head_major_attention(heads_first(q), heads_first(k), heads_first(v),
                                          mask, bias))


def _param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...],
           axes: tuple[str | None, ...], dtype: Dtype) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with learned projections.

  Self-attention (`inputs_kv` is None) uses one fused QKV kernel [D, 3, H, K]; cross-attention
  uses a query kernel [D, H, K] and a fused key-value kernel [Dkv, 2, H, K].

  Incremental decoding reuses the same parameters: `attend_cached` (self-attention of new
  tokens against a KV cache) and `project_kv` + `attend_kv` (cross-attention whose keys and
  values are computed once per sequence).

  Attributes:
    num_heads: number of heads H.
    head_dim: K; defaults to D // H.
    out_features: output width; defaults to D (the query input width).
    use_bias: biases on the projections.
    dtype: computation dtype (scores and softmax are always float32).
    param_dtype: parameter dtype.
  """
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _projection(self, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                  init: Initializer) -> tuple[jax.Array, jax.Array | None]:
    """A new projection `name`: (kernel `shape` [D, ...], bias [shape[1:]] or None)."""
    kernel = _param(self, f'{name}_kernel', init, shape, axes, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = _param(self, f'{name}_bias', nn.initializers.zeros, shape[1:], axes[1:],
                    self.param_dtype)
    return kernel, bias

  def _project(self, x: jax.Array, name: str, shape: tuple[int, ...],
               axes: tuple[str | None, ...], init: Initializer) -> jax.Array:
    """[B, L, D] `x` through a new projection `name` (see `_projection`), returning
    [B, L, *shape[1:]]."""
    return self._dense(x, *self._projection(name, shape, axes, init), 1)

  def _dense(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
             num_in: int) -> jax.Array:
    """[..., *kernel.shape[:num_in]] `x` times `kernel`, plus `bias`, in `self.dtype`:
    [..., *kernel.shape[num_in:]] (`ops.flat_affine`, see `__call__`)."""
    return ops.flat_affine(x.astype(self.dtype), kernel.astype(self.dtype),
                           None if bias is None else bias.astype(self.dtype), num_in)

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, bias: jax.Array | None = None,
               query_rows: jax.Array | None = None) -> jax.Array:
    """Attends from `inputs_q` to `inputs_kv` (itself when None).

    Each projection is one 2-D matmul of the [B L, D] tokens (queries, keys and values come
    out [B, L, H, K]); the score and value contractions then run head-major, [B, H, L, K],
    so that they batch over leading axes. On CPU, projecting straight into the head-major
    layout (a 3-D einsum) made XLA copy an operand to a transposed layout for every weight
    gradient: `configs/clip_shapes.py`'s step is 8% faster this way, and 3% faster than with
    `jax.nn.dot_product_attention` on the [B, L, H, K] projections.

    Args:
      inputs_q: [B, Lq, D].
      inputs_kv: [B, Lk, Dkv] or None for self-attention.
      mask: bool, broadcastable to [B, H, Lq, Lk]; True = attend.
      bias: additive logits bias, broadcastable to [B, H, Lq, Lk].
      query_rows: self-attention only: [B, Q] int, the positions of `inputs_q` whose outputs
        are wanted. Only those Q rows are projected to queries and attend (keys and values
        still come from every row); `mask` and `bias` then broadcast to [B, H, Q, Lk].

    Returns:
      [B, Lq, out_features], or [B, Q, out_features] with `query_rows`.
    """
    width = inputs_q.shape[-1]
    heads = self.num_heads
    if self.head_dim is None and width % heads:
      raise ValueError(f'Attention width {width} is not divisible by num_heads={heads}.')
    head_dim = self.head_dim or width // heads
    if query_rows is not None and inputs_kv is not None:
      raise ValueError('query_rows applies to self-attention only (inputs_kv=None).')
    if inputs_kv is None:
      kernel, qkv_bias = self._projection('qkv', (width, 3, heads, head_dim),
                                          ('embed', None, 'heads', 'kv'), QKV_INIT)
      if query_rows is None:
        qkv = self._dense(inputs_q, kernel, qkv_bias, 1)  # [B, L, 3, H, K]
        # Unstacked, not indexed: the gradient is then one concatenation, not three padded
        # adds (in bf16 on CPU the :bench step is 8% faster).
        q, k, v = jnp.unstack(qkv, axis=2)
      else:
        part = lambda b, i: None if b is None else b[i]
        q = self._dense(select_rows(inputs_q, query_rows), kernel[:, 0],
                        part(qkv_bias, 0), 1)  # [B, Q, H, K]
        kv = self._dense(inputs_q, kernel[:, 1:], part(qkv_bias, slice(1, None)), 1)
        k, v = jnp.unstack(kv, axis=2)  # [B, L, H, K] each
    else:
      q = self._project(inputs_q, 'query', (width, heads, head_dim),
                        ('embed', 'heads', 'kv'), Q_INIT)  # [B, Lq, H, K]
      kv = self._project(inputs_kv, 'kv', (inputs_kv.shape[-1], 2, heads, head_dim),
                         ('embed', None, 'heads', 'kv'), QKV_INIT)  # [B, Lk, 2, H, K]
      k, v = jnp.unstack(kv, axis=2)
    out = token_major_attention(q, k, v, mask, bias)  # [B, Lq, H, K]
    out_features = self.out_features or width
    out_kernel = _param(self, 'out_kernel', OUT_INIT, (heads, head_dim, out_features),
                        ('heads', 'kv', 'embed'), self.param_dtype)
    out_bias = None
    if self.use_bias:
      out_bias = _param(self, 'out_bias', nn.initializers.zeros, (out_features,), ('embed',),
                        self.param_dtype)
    return self._dense(out, out_kernel, out_bias, 2)  # [B, Lq, D]

  # Incremental decoding. These methods read the parameters that `__call__` created (run it
  # once first, e.g. through `init`); they create none.

  def _stored_dense(self, x: jax.Array, name: str, num_in: int = 1) -> jax.Array:
    """`x` through the existing projection `name` ('qkv', 'query', 'kv' or 'out')."""
    def get(suffix):
      value = self.get_variable('params', f'{name}_{suffix}')
      if value is None:
        raise ValueError(f'MultiHeadAttention {self.name!r} has no parameter {name}_{suffix}: '
                         'call the module on full inputs (e.g. model.init) before decoding.')
      return nn.unbox(value)
    return self._dense(x, get('kernel'), get('bias') if self.use_bias else None, num_in)

  def project_kv(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys and values of [B, Lk, Dkv] inputs: two [B, Lk, H, K] arrays, to
    compute once and pass to `attend_kv` at every decoding step."""
    kv = self._stored_dense(inputs_kv, 'kv')  # [B, Lk, 2, H, K]
    return kv[:, :, 0], kv[:, :, 1]

  def attend_kv(self, inputs_q: jax.Array, key: jax.Array, value: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
    """Cross-attention from [B, Lq, D] queries to the keys and values of `project_kv`;
    equals `__call__(inputs_q, inputs_kv, mask)`. Returns [B, Lq, out_features]."""
    q = self._stored_dense(inputs_q, 'query')  # [B, Lq, H, K]
    out = token_major_attention(q, key, value, mask)
    return self._stored_dense(out, 'out', 2)

  def attend_cached(self, inputs_q: jax.Array, key_cache: jax.Array, value_cache: jax.Array,
                    index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal self-attention of Lq new tokens at positions index .. index + Lq - 1, with the
    keys and values of earlier positions from a fixed-size cache.

    Args:
      inputs_q: [B, Lq, D], the new tokens.
      key_cache, value_cache: [B, M, H, K]; positions >= index are ignored (masked).
      index: int32 [], the position of the first new token (the same for every row).

    Returns:
      ([B, Lq, out_features], the caches with the new keys and values written at `index`).
      Equals `__call__` on the whole prefix with a causal mask, at the new positions.
    """
    qkv = self._stored_dense(inputs_q, 'qkv')  # [B, Lq, 3, H, K]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    start = (0, index, 0, 0)
    key_cache = jax.lax.dynamic_update_slice(key_cache, k.astype(key_cache.dtype), start)
    value_cache = jax.lax.dynamic_update_slice(value_cache, v.astype(value_cache.dtype), start)
    query_pos = index + jnp.arange(inputs_q.shape[1])  # [Lq]
    mask = jnp.arange(key_cache.shape[1])[None, :] <= query_pos[:, None]  # [Lq, M]
    out = token_major_attention(q, key_cache.astype(q.dtype), value_cache.astype(q.dtype),
                                mask[None, None])  # [B, Lq, H, K]
    return self._stored_dense(out, 'out', 2), key_cache, value_cache
