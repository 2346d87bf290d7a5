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


def _gradient_specs(spec: str) -> tuple[str, str]:
  """The einsums of the two gradients of 'a,b->out': (g, b -> da) and (a, g -> db)."""
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  return f'{out},{sb}->{sa}', f'{sa},{out}->{sb}'


def _low_precision_einsum_bwd(spec, out_dtype, residuals, g):
  a, b = residuals
  g = g.astype(a.dtype)
  spec_a, spec_b = _gradient_specs(spec)
  return _accumulated(spec_a, g, b, a.dtype), _accumulated(spec_b, a, g, b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def _row_major_plan(spec: str, sizes: dict[str, int]) -> tuple[str, str, str, str]:
  """How `_row_major_einsum` computes a two-operand `spec` (`sizes`: index -> length):
  (operand order, 'ab' or 'ba'; lhs layout; rhs layout; product layout).

  The lhs is laid out [batch, free, contracted]; the rhs [batch, contracted, free] or
  [batch, free, contracted] (XLA's CPU matmul kernels take a transposed rhs as is); the
  product is [batch, lhs free, rhs free], copied to the output's layout where that differs.
  Of the two operand orders the one that copies fewer elements wins ('ab' on a tie).
  """
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  batch = ''.join(c for c in out if c in sa and c in sb)
  contract = ''.join(c for c in sa if c in sb and c not in out)
  plans = []
  for order, (s1, s2) in (('ab', (sa, sb)), ('ba', (sb, sa))):
    free1 = ''.join(c for c in s1 if c not in s2)
    free2 = ''.join(c for c in s2 if c not in s1)
    lhs = batch + free1 + contract
    rhs = s2 if s2 in (batch + contract + free2, batch + free2 + contract) else (
        batch + contract + free2)
    mid = batch + free1 + free2
    copied = sum(math.prod(sizes[c] for c in layout)
                 for layout, wanted in ((s1, lhs), (s2, rhs), (out, mid)) if layout != wanted)
    plans.append((copied, order, lhs, rhs, mid))
  return min(plans, key=lambda plan: plan[0])[1:]


def _row_major_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, a, b)` as one batched matmul of operands copied to row-major layouts
  (`_row_major_plan`). The barriers keep XLA from folding the copies back into the dot."""
  inputs, out = spec.split('->')
  operands = tuple(zip(inputs.split(','), (a, b)))
  sizes = {c: n for s, t in operands for c, n in zip(s, t.shape)}
  order, lhs, rhs, mid = _row_major_plan(spec, sizes)
  (s1, x), (s2, y) = operands if order == 'ab' else operands[::-1]
  barrier = jax.lax.optimization_barrier
  move = lambda t, src, dst: t if src == dst else barrier(jnp.einsum(f'{src}->{dst}', t))
  product = jnp.einsum(f'{lhs},{rhs}->{mid}', move(x, s1, lhs), move(y, s2, rhs))
  return product if mid == out else jnp.einsum(f'{mid}->{out}', barrier(product))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_f32_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b)


def _cpu_f32_einsum_fwd(spec, a, b):
  return _cpu_f32_einsum(spec, a, b), (a, b)


def _cpu_f32_einsum_bwd(spec, residuals, g):
  a, b = residuals
  spec_a, spec_b = _gradient_specs(spec)
  return _row_major_einsum(spec_a, g, b), _row_major_einsum(spec_b, a, g)


_cpu_f32_einsum.defvjp(_cpu_f32_einsum_fwd, _cpu_f32_einsum_bwd)


def _cpu_float32(a: jax.Array, b: jax.Array) -> bool:
  """Whether `einsum` and `affine` take their float32 CPU path (`_cpu_f32_einsum`)."""
  return a.dtype == b.dtype == jnp.float32 and jax.default_backend() == 'cpu'


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """`jnp.einsum` of two operands (`out_dtype`: default theirs); in bfloat16 or float16 the
  forward and both backward products take low-precision inputs and accumulate in float32.

  XLA's CPU backend runs such a product as one bf16 x bf16 -> f32 kernel (AMX where the CPU
  has it: 0.5-1.3 TFLOP/s on 2 Xeon cores), while it computes a bf16 -> bf16 dot, or the
  mixed-dtype dots that autodiff makes of a `preferred_element_type=float32` product, by
  converting to float32 first (0.2 TFLOP/s). GPUs and TPUs accumulate a low-precision dot in
  float32 anyway, and a float32 result would cost them memory traffic and a conversion: on
  them (any backend but 'cpu') this is the plain `jnp.einsum`. Every index must appear in
  the output or in both operands (so that each gradient is again such an einsum).

  In float32 on CPU the forward is the plain `jnp.einsum` and each gradient product runs on
  operands copied to row-major layouts (`_row_major_einsum`): autodiff makes products that
  contract a leading axis of the lhs (the weight gradient x^T g of a dense layer, the key
  and value gradients of attention), which XLA's CPU backend hands to Eigen (about 130
  GFLOP/s on 2 cores of a Zen 3 EPYC, on a thread pool that then contends with the other
  kernels) instead of its YNNPACK matmuls (165-175); the copies cost a few percent of that.
  Other dtypes take the plain `jnp.einsum`.
  """
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  if not set(sa) <= set(sb + out) or not set(sb) <= set(sa + out):
    raise ValueError(f'einsum {spec!r}: an index of one operand is summed out alone; each '
                     'index must be in the output or in both operands.')
  if _cpu_low_precision(a, b):
    return _low_precision_einsum(spec, a, b, jnp.dtype(out_dtype or a.dtype))
  out = _cpu_f32_einsum(spec, a, b) if _cpu_float32(a, b) else jnp.einsum(spec, a, b)
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
  axes and, on CPU, copies an operand to a transposed layout in a slow loop; the 2-D form
  avoided that (13% off `configs/clip_shapes.py`'s step on a Xeon for the MLPs, 8% more for
  the attention), and its float32 gradients now copy the narrower operand on purpose (see
  `einsum`). Elsewhere the reshapes are free.
  """
  fan_in = math.prod(kernel.shape[:num_in])
  y = affine(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1),
             None if bias is None else bias.reshape(-1))
  return y.reshape(*x.shape[:x.ndim - num_in], *kernel.shape[num_in:])


def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
  """[..., D] x [V, D] token embedding -> [..., V] float32 logits, by `flat_affine`."""
  return flat_affine(x.astype(jnp.float32), embedding.astype(jnp.float32).T)
