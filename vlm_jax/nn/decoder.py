"""Pre-LN transformer decoder block: causal self-attention (with a KV cache for incremental
decoding), optional cross-attention to context tokens, MLP."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn.attention import MultiHeadAttention
from vlm_jax.nn.transformer import ACTIVATION_AXES, Mlp, layer_norm

Dtype = Any
LayerCache = dict[str, jax.Array]  # {'key', 'value'}: [B, M, H, K] each


class DecoderBlock(nn.Module):
  """x += SelfAttn(LN(x)); [x += CrossAttn(LN(x), context)]; x += MLP(LN(x)).

  Parameters: 'ln_self', 'self_attn', ('ln_cross', 'cross_attn' with `cross_attention`),
  'ln_mlp', 'mlp'. Dropout (rate `dropout_rate`) is applied to the residual branches and
  after the MLP activation.

  Full sequences go through `__call__` (the caller passes the causal mask); one decoding
  step goes through `step`, with the self-attention keys and values of earlier positions in
  a fixed-size cache and the cross-attention keys and values from `context_kv`, computed
  once per sequence. Both give the same outputs.
  """
  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    attn = lambda name: MultiHeadAttention(self.num_heads, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name=name)
    self.ln_self, self.self_attn = ln('ln_self'), attn('self_attn')
    if self.cross_attention:
      self.ln_cross, self.cross_attn = ln('ln_cross'), attn('cross_attn')
    self.ln_mlp = ln('ln_mlp')
    self.mlp = Mlp(self.mlp_dim, self.activation, self.dropout_rate, self.dtype,
                   self.param_dtype, name='mlp')
    self.dropout = nn.Dropout(self.dropout_rate)

  def _check_context(self, context: Any) -> None:
    if self.cross_attention and context is None:
      raise ValueError('A DecoderBlock with cross_attention needs context tokens.')

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x: [B, L, D]; context: [B, N, Dc] (cross-attention) or None; mask: the self-attention
    mask, bool broadcastable to [B, H, L, L]. Returns [B, L, D]."""
    self._check_context(context)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    drop = lambda y: self.dropout(y, deterministic)
    x = x + drop(self.self_attn(self.ln_self(x), mask=mask))
    if self.cross_attention:
      x = x + drop(self.cross_attn(self.ln_cross(x), context.astype(self.dtype)))
    x = x + drop(self.mlp(self.ln_mlp(x), deterministic))
    return nn.with_logical_constraint(x, ACTIVATION_AXES)

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """Cross-attention keys and values of context [B, N, Dc]: ([B, N, H, K], [B, N, H, K]),
    or None for a block without cross-attention."""
    if not self.cross_attention:
      return None
    return self.cross_attn.project_kv(context.astype(self.dtype))

  def step(self, x: jax.Array, cache: LayerCache, index: jax.Array,
           context_kv: tuple[jax.Array, jax.Array] | None = None
           ) -> tuple[jax.Array, LayerCache]:
    """The new tokens x [B, Lq, D] at positions index .. index + Lq - 1 (int32 [] shared by
    all rows); returns ([B, Lq, D], the cache with their keys and values written)."""
    self._check_context(context_kv)
    y, key, value = self.self_attn.attend_cached(self.ln_self(x), cache['key'], cache['value'],
                                                 index)
    x = x + y
    if self.cross_attention:
      x = x + self.cross_attn.attend_kv(self.ln_cross(x), *context_kv)
    x = x + self.mlp(self.ln_mlp(x), True)
    return x, {'key': key, 'value': value}
