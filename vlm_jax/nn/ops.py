"""Small numerical helpers shared by models."""
import functools
import math

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, computed in float32; finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _accumulated(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def _cpu_low_precision(a: jax.Array, b: jax.Array) -> bool:
  """Whether `einsum` and `affine` take their float32-accumulating bf16/f16 path."""
  return (a.dtype == b.dtype and a.dtype in LOW_PRECISION
          and jax.default_backend() == 'cpu')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _low_precision_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  return _accumulated(spec, a, b, out_dtype)


def _low_precision_einsum_fwd(spec, a, b, out_dtype):
  return _accumulated(spec, a, b, out_dtype), (a, b)


def _low_precision_einsum_bwd(spec, out_dtype, residuals, g):
  a, b = residuals
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  g = g.astype(a.dtype)
  return (_accumulated(f'{out},{sb}->{sa}', g, b, a.dtype),
          _accumulated(f'{sa},{out}->{sb}', a, g, b.dtype))


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """`jnp.einsum` of two operands (`out_dtype`: default theirs); in bfloat16 or float16 the
  forward and both backward products take low-precision inputs and accumulate in float32.

  XLA's CPU backend runs such a product as one bf16 x bf16 -> f32 kernel (AMX where the CPU
  has it: 0.5-1.3 TFLOP/s on 2 Xeon cores), while it computes a bf16 -> bf16 dot, or the
  mixed-dtype dots that autodiff makes of a `preferred_element_type=float32` product, by
  converting to float32 first (0.2 TFLOP/s). GPUs and TPUs accumulate a low-precision dot in
  float32 anyway, and a float32 result would cost them memory traffic and a conversion: on
  them (any backend but 'cpu') this is the plain `jnp.einsum`. Every index must appear in
  the output or in both operands (so that each gradient is again such an einsum); other
  dtypes then take the plain `jnp.einsum`.
  """
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  if not set(sa) <= set(sb + out) or not set(sb) <= set(sa + out):
    raise ValueError(f'einsum {spec!r}: an index of one operand is summed out alone; each '
                     'index must be in the output or in both operands.')
  if _cpu_low_precision(a, b):
    return _low_precision_einsum(spec, a, b, jnp.dtype(out_dtype or a.dtype))
  out = jnp.einsum(spec, a, b)
  return out if out_dtype is None else out.astype(out_dtype)


@jax.custom_vjp
def _low_precision_affine(x: jax.Array, w: jax.Array, bias: jax.Array) -> jax.Array:
  return _accumulated('nk,km->nm', x, w, x.dtype) + bias.astype(x.dtype)


def _low_precision_affine_fwd(x, w, bias):
  return _low_precision_affine(x, w, bias), (x, w, bias)


def _low_precision_affine_bwd(residuals, g):
  x, w, bias = residuals
  g = g.astype(x.dtype)
  dbias = jnp.sum(g.astype(jnp.float32), axis=0).astype(bias.dtype)
  return (_accumulated('nm,km->nk', g, w, x.dtype), _accumulated('nk,nm->km', x, g, w.dtype),
          dbias)


_low_precision_affine.defvjp(_low_precision_affine_fwd, _low_precision_affine_bwd)


def affine(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """[N, K] x [K, M] (+ bias [M]) -> [N, M], as `einsum` (low precision: float32
  accumulation on CPU); the bias gradient is summed in float32 there (XLA's CPU backend
  sums a bfloat16 one slowly, by pairwise reduce-windows)."""
  if bias is None or not _cpu_low_precision(x, w):
    y = einsum('nk,km->nm', x, w)
    return y if bias is None else y + bias.astype(y.dtype)
  return _low_precision_affine(x, w, bias)


def flat_affine(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                num_in: int = 1) -> jax.Array:
  """[..., *in] x kernel [*in, *out] (+ bias [*out]) -> [..., *out], as one `affine` of
  [N, prod(in)] x [prod(in), prod(out)].

  On a [B, L, D] input XLA's dot canonicalisation contracts the weight gradient over two
  axes and, on CPU, first copies an operand to a transposed layout; the 2-D form needs no
  copy (13% off `configs/clip_shapes.py`'s step on CPU for the MLPs, 8% more for the
  attention). Elsewhere the reshapes are free.
  """
  fan_in = math.prod(kernel.shape[:num_in])
  y = affine(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1),
             None if bias is None else bias.reshape(-1))
  return y.reshape(*x.shape[:x.ndim - num_in], *kernel.shape[num_in:])


def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
  """[..., D] x [V, D] token embedding -> [..., V] float32 logits, by `flat_affine`."""
  return flat_affine(x.astype(jnp.float32), embedding.astype(jnp.float32).T)
