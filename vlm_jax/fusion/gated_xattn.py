"""Flamingo fusion (Alayrac et al., 2022): tanh-gated cross-attention blocks interleaved with
language-model blocks; with zero gates the layer is exactly the language model."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import fusion
from vlm_jax.nn.attention import MultiHeadAttention
from vlm_jax.nn.transformer import ACTIVATION_AXES, EncoderBlock, Mlp, layer_norm

Dtype = Any


class GatedCrossAttentionBlock(nn.Module):
  """x += tanh(attn_gate) CrossAttn(LN(x), image); x += tanh(mlp_gate) MLP(LN(x)).

  The scalar gates 'attn_gate' and 'mlp_gate' start at 0, so that the block starts as the
  identity. Parameters: 'ln1', 'cross_attn', 'attn_gate', 'ln2', 'mlp', 'mlp_gate'.
  """
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _gate(self, name: str) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.zeros, ())
    return jnp.tanh(self.param(name, init, (), self.param_dtype)).astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, image_tokens: jax.Array, cross_mask: jax.Array | None,
               deterministic: bool = True) -> jax.Array:
    """x: [B, L, D]; image_tokens: [B, N, Di]; cross_mask broadcastable to [B, H, L, N]."""
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name='cross_attn')(ln('ln1')(x), image_tokens, mask=cross_mask)
    x = x + self._gate('attn_gate') * drop(y)  # [B, L, D]
    y = Mlp(self.mlp_dim, self.activation, self.dropout_rate, self.dtype, self.param_dtype,
            name='mlp')(ln('ln2')(x), deterministic)
    x = x + self._gate('mlp_gate') * drop(y)
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class GatedCrossAttentionFusion(nn.Module):
  """`depth` EncoderBlocks 'block_{i}', each of those with i % every == 0 preceded by a
  GatedCrossAttentionBlock 'gated_{i}', then the LayerNorm 'ln_final'. [B, L, D] out.

  Parameters: 'text_in' (only when Dt != D), 'gated_{i}', 'block_{i}', 'ln_final'. The
  'block_{i}' and 'ln_final' subtrees are those of a plain stack of EncoderBlocks with a final
  LayerNorm (a text tower's 'encoder' and 'ln_final'), so a language model's weights load
  directly, and at initialisation (gates 0) the output equals that language model's.

  Attributes:
    width: D; 0 = the width of the text tokens.
    every: a gated block before every `every`-th LM block (Flamingo: 1 to 7).
    causal: causal self-attention in the LM blocks (Flamingo); bidirectional otherwise.
      Padding keys are masked in both cases.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  every: int = 1
  causal: bool = False
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_tokens: jax.Array, image_mask: jax.Array | None,
               text_tokens: jax.Array, text_mask: jax.Array, deterministic: bool = True
               ) -> jax.Array:
    """Image [B, N, Di], mask [B, N] | None; text [B, L, Dt], mask [B, L] -> [B, L, D]."""
    if self.every < 1:
      raise ValueError(f'model.fusion.every must be >= 1, got {self.every}.')
    x, self_mask, image_tokens, cross_mask = fusion.text_stream(
        text_tokens, text_mask, image_tokens, image_mask, self.width, self.causal, self.dtype,
        self.param_dtype)  # [B, L, D]
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  dropout_rate=self.dropout_rate, layer_norm_eps=self.layer_norm_eps,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.depth):
      if i % self.every == 0:
        x = GatedCrossAttentionBlock(name=f'gated_{i}', **kwargs)(x, image_tokens, cross_mask,
                                                                   deterministic)
      x = EncoderBlock(name=f'block_{i}', **kwargs)(x, self_mask, deterministic)
    return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')(x)


@fusion.register_fusion('gated_xattn')
def build_gated_xattn(model_cfg: ml_collections.ConfigDict) -> GatedCrossAttentionFusion:
  return GatedCrossAttentionFusion(every=model_cfg.fusion.every,
                                   causal=bool(model_cfg.fusion.causal),
                                   activation=fusion.text_activation(model_cfg),
                                   **fusion.fusion_kwargs(model_cfg))
