"""Text transformer tower: causal (CLIP) or bidirectional (BERT-style) self-attention."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.nn.attention import causal_mask, combine_masks, padding_mask
from vlm_jax.nn.pooling import cls_pool, eot_pool, mean_pool
from vlm_jax.nn.transformer import ACTIVATION_AXES, Encoder, layer_norm

Dtype = Any
POOLS = ('eot', 'cls', 'mean')


class TextTransformer(nn.Module):
  """Token ids [B, L] and mask [B, L] -> (pooled [B, D], tokens [B, L, D]), after the final
  LayerNorm.

  Attributes:
    vocab_size: number of token ids.
    max_len: number of learned positions; inputs may be shorter, never longer.
    causal: CLIP's causal self-attention; False for bidirectional (BERT) attention. Padding
      keys are masked in both cases.
    pool: 'eot' (the EOS token, the last real token: CLIP), 'cls' (first token) or 'mean'.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = True
  pool: str = 'eot'
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    """text_ids: [B, L] int; text_mask: [B, L] bool, True for real tokens (incl. EOS)."""
    check_choice('model.text.pool', self.pool, POOLS)
    if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
      raise ValueError(f'Expected text_ids and text_mask shaped [batch, length], got '
                       f'{tuple(text_ids.shape)} and {tuple(text_mask.shape)}.')
    length = text_ids.shape[1]
    if length > self.max_len:
      raise ValueError(f'Text length {length} exceeds the {self.max_len} learned positions '
                       '(data.max_text_len).')
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(0.02), ('vocab', 'embed')),
                 name='token_embed')(text_ids)  # [B, L, D]
    pos = self.param('pos_embed', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, 'embed')), (self.max_len, self.width),
                     self.param_dtype)
    x = x + pos[None, :length].astype(self.dtype)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    mask = combine_masks(causal_mask(length) if self.causal else None,
                         padding_mask(text_mask))  # [B, 1, L, L] or [B, 1, 1, L]
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.dropout_rate,
                self.layer_norm_eps, self.remat, self.scan_layers, self.dtype,
                self.param_dtype, name='encoder')(x, mask, deterministic)  # [B, L, D]
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')(x)
    if self.pool == 'eot':
      pooled = eot_pool(x, text_mask)
    elif self.pool == 'cls':
      pooled = cls_pool(x)
    else:
      pooled = mean_pool(x, text_mask)
    return pooled, x
