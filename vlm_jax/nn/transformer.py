"""Pre-LN transformer: MLP, encoder block, and a stack of blocks with remat and scan options."""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.nn import ops
from vlm_jax.nn.attention import MultiHeadAttention, select_mask_rows, select_rows

Dtype = Any
ACTIVATIONS = ('gelu', 'quick_gelu', 'gelu_tanh')
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)
ACTIVATION_AXES = ('batch', 'length', 'embed')


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), computed in float32 and returned in x's dtype.

  Written with erf: jax.nn.gelu(approximate=False) uses erfc, which XLA's CPU backend
  lowers to several unfused loops (4x slower forward); the two differ by about 1e-6 in f32.
  In float32 a bf16 activation also skips the rounding after every elementwise op (3% off
  the bf16 :bench step on CPU).
  """
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2))))).astype(x.dtype)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """'gelu' (exact, erf), 'quick_gelu' or 'gelu_tanh' (tanh approximation, SigLIP)."""
  if name == 'gelu':
    return gelu
  if name == 'gelu_tanh':
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == 'quick_gelu':
    return quick_gelu
  raise ValueError(f'Unknown activation {name!r}; accepted: {", ".join(ACTIVATIONS)}.')


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over the last ('embed') axis with logically partitioned scale and bias."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Dense(nn.Dense):
  """nn.Dense (same parameters) computed by `ops.flat_affine`: one [N, in] x [in, out]
  product, low-precision ones accumulated in float32."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(inputs, kernel)
    return ops.flat_affine(inputs.astype(dtype), kernel.astype(dtype),
                           None if bias is None else bias.astype(dtype))


def dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype,
          name: str, use_bias: bool = True,
          kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
          ) -> nn.Dense:
  """`Dense` with kernel names `axes` (in, out) and bias named like the output."""
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class Mlp(nn.Module):
  """Two-layer MLP: [B, L, D] -> [B, L, mlp_dim] -> [B, L, D]."""
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x.shape[-1]
    act = activation_fn(self.activation)
    h = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, self.param_dtype, 'fc1')(x)
    h = nn.Dropout(self.dropout_rate)(act(h), deterministic)  # [B, L, F]
    return dense(width, ('mlp', 'embed'), self.dtype, self.param_dtype, 'fc2')(h)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)). [B, L, D] -> [B, L, D].

  With `norm_first=False` it is BERT's post-LN block: LN(x + Attn(x)), then LN(x + MLP(x)),
  with the same parameters ('ln1' after attention, 'ln2' after the MLP).

  Dropout (rate `dropout_rate`) is applied to both residual branches and after the MLP
  activation; attention probabilities are not dropped.
  """
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_first: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True, rows: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; mask: bool broadcastable to [B, H, L, L]. Returns [B, L, D].

    With `rows` [B, Q] int, only those rows of the output are computed, [B, Q, D] (they
    attend to every row; the mask is then [B | 1, 1, Q | 1, L]): the last block of a tower
    whose only output is one pooled token.
    """
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    pre = (lambda name, h: ln(name)(h)) if self.norm_first else (lambda _, h: h)
    post = (lambda _, h: h) if self.norm_first else (lambda name, h: ln(name)(h))
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name='attn')(pre('ln1', x), mask=mask, query_rows=rows)
    if rows is not None:
      x = select_rows(x, rows)  # [B, Q, D]
    x = post('ln1', x + nn.Dropout(self.dropout_rate)(y, deterministic))  # [B, L | Q, D]
    y = Mlp(self.mlp_dim, self.activation, self.dropout_rate, self.dtype, self.param_dtype,
            name='mlp')(pre('ln2', x), deterministic)
    x = post('ln2', x + nn.Dropout(self.dropout_rate)(y, deterministic))  # [B, L | Q, D]
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class _ScanBlock(EncoderBlock):
  """EncoderBlock with nn.scan's (carry, per-step output) signature."""

  def __call__(self, x, mask=None, deterministic=True, rows=None):
    return super().__call__(x, mask, deterministic, rows), None


class Encoder(nn.Module):
  """A stack of `depth` EncoderBlocks: [B, L, D] -> [B, L, D] (no final LayerNorm).

  Parameters live under 'block_{i}' for each layer, or with `scan_layers` under a single
  'blocks' subtree whose leaves have a leading 'layers' axis of size `depth`; stacking the
  per-layer leaves along axis 0 converts one into the other.

  Attributes:
    remat: 'none', 'full' (recompute the block in the backward pass) or 'dots_saveable'
      (keep matmul outputs, recompute the rest).
    scan_layers: run the blocks with nn.scan (one compiled block, faster compilation).
    norm_first: pre-LN blocks (True) or BERT's post-LN blocks (False).

  `rows` [B, Q] int asks for those output rows only, [B, Q, D]: the last block then computes
  its queries, attention output and MLP on Q rows instead of L (with one pooled token and L
  tokens, about 5/6 of that block's FLOPs are saved). Scanned layers compute every row and
  select after.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_first: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True, rows: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; mask: bool broadcastable to [B, H, L, L]; rows: optional [B, Q] int.
    Returns [B, L, D], or [B, Q, D] with `rows`."""
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f'Unknown remat {self.remat!r}; accepted: {", ".join(REMAT_CHOICES)}.')
    block_cls = _ScanBlock if self.scan_layers else EncoderBlock
    if self.remat != 'none':
      # Argument 0 is the module itself, so `deterministic` is argument 3.
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat],
                           prevent_cse=not self.scan_layers, static_argnums=(3,))
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  dropout_rate=self.dropout_rate, layer_norm_eps=self.layer_norm_eps,
                  dtype=self.dtype, param_dtype=self.param_dtype, norm_first=self.norm_first)
    if self.scan_layers:
      blocks = nn.scan(block_cls, variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = blocks(name='blocks', **kwargs)(x, mask, deterministic)
      return x if rows is None else select_rows(x, rows)
    for i in range(self.depth):
      last = rows is not None and i == self.depth - 1
      x = block_cls(name=f'block_{i}', **kwargs)(
          x, select_mask_rows(mask, rows) if last else mask, deterministic,
          rows if last else None)
    return x if rows is None or self.depth else select_rows(x, rows)


def stack_layer_params(params: dict, depth: int) -> dict:
  """Encoder params {'block_0': t0, ..., 'block_{d-1}': t} -> {'blocks': stacked} (scan)."""
  blocks = [params[f'block_{i}'] for i in range(depth)]
  return {'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layer_params(params: dict) -> dict:
  """Encoder params {'blocks': stacked} (scan) -> {'block_0': t0, ...}."""
  stacked = params['blocks']
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return {f'block_{i}': jax.tree.map(lambda x: x[i], stacked) for i in range(depth)}
