"""ALBEF / BLIP fusion: a text transformer whose blocks also cross-attend to image tokens."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import fusion
from vlm_jax.nn.attention import MultiHeadAttention
from vlm_jax.nn.transformer import ACTIVATION_AXES, Mlp, layer_norm

Dtype = Any


class CrossAttentionBlock(nn.Module):
  """Pre-LN block: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), image); x += MLP(LN(x)).

  Dropout (rate `dropout_rate`) is applied to the three residual branches and after the MLP
  activation.
  """
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, image_tokens: jax.Array, self_mask: jax.Array | None,
               cross_mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
    """x: [B, L, D]; image_tokens: [B, N, Di]; masks broadcastable to [B, H, L, L | N]."""
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    attn = lambda name: MultiHeadAttention(self.num_heads, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name=name)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    x = x + drop(attn('self_attn')(ln('ln1')(x), mask=self_mask))  # [B, L, D]
    x = x + drop(attn('cross_attn')(ln('ln2')(x), image_tokens, mask=cross_mask))
    x = x + drop(Mlp(self.mlp_dim, self.activation, self.dropout_rate, self.dtype,
                     self.param_dtype, name='mlp')(ln('ln3')(x), deterministic))
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class CrossAttentionFusion(nn.Module):
  """`depth` CrossAttentionBlocks on the text tokens, then a final LayerNorm.

  Parameters: 'text_in' (only when Dt != D), 'block_{i}' (self_attn, cross_attn, mlp,
  ln1-ln3), 'ln_final'.

  Attributes:
    width: D; 0 = the width of the text tokens.
    causal: causal self-attention (BLIP's decoder); bidirectional otherwise (ALBEF, BLIP's
      image-grounded text encoder). Padding keys are masked in both cases.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
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
    x, self_mask, image_tokens, cross_mask = fusion.text_stream(
        text_tokens, text_mask, image_tokens, image_mask, self.width, self.causal, self.dtype,
        self.param_dtype)  # [B, L, D]
    for i in range(self.depth):
      x = CrossAttentionBlock(self.num_heads, self.mlp_dim, self.activation, self.dropout_rate,
                              self.layer_norm_eps, self.dtype, self.param_dtype,
                              name=f'block_{i}')(x, image_tokens, self_mask, cross_mask,
                                                 deterministic)
    return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')(x)


@fusion.register_fusion('cross_attention')
def build_cross_attention(model_cfg: ml_collections.ConfigDict) -> CrossAttentionFusion:
  return CrossAttentionFusion(causal=bool(model_cfg.fusion.causal),
                              activation=fusion.text_activation(model_cfg),
                              **fusion.fusion_kwargs(model_cfg))
