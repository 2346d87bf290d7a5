"""Text transformer tower: causal (CLIP) or bidirectional (BERT-style) self-attention."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.nn.attention import causal_mask, combine_masks, padding_mask
from vlm_jax.nn.pooling import cls_pool, eot_index, eot_pool, mean_pool
from vlm_jax.nn.transformer import ACTIVATION_AXES, Encoder, layer_norm

Dtype = Any
POOLS = ('eot', 'cls', 'mean', 'last')


class TextTransformer(nn.Module):
  """Token ids [B, L] and mask [B, L] -> (pooled [B, D], tokens [B, L, D]), after the final
  LayerNorm. With `pooled_only=True` and pool 'eot', 'cls' or 'last', tokens is None and the
  last block computes the pooled token's row alone (see `Encoder`).

  Attributes:
    vocab_size: number of token ids.
    max_len: number of learned positions; inputs may be shorter, never longer.
    causal: CLIP's causal self-attention; False for bidirectional (BERT) attention. Padding
      keys are masked in both cases.
    pool: 'eot' (the EOS token, the last real token: CLIP), 'cls' (first token), 'mean', or
      'last' (the last position whatever the mask, SigLIP: texts padded to max length).
    post_ln: BERT's layout: LayerNorm after the embeddings ('ln_embed'), post-LN blocks, no
      final LayerNorm. False (CLIP, SigLIP): pre-LN blocks and a final LayerNorm.
    type_vocab_size: > 0 adds BERT's token-type embedding ('type_embed') of type 0.
    mask_pad: mask padding keys in attention; False attends to padding tokens like real
      ones, as SigLIP was trained (its texts are padded to max length without a mask).
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
  post_ln: bool = False
  type_vocab_size: int = 0
  mask_pad: bool = True

  def _embed(self, text_ids: jax.Array) -> jax.Array:
    """Token, position (and type-0) embeddings: [B, L] -> [B, L, D]."""
    embed = lambda num, name: nn.Embed(
        num, self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ('vocab', 'embed')))
    x = embed(self.vocab_size, 'token_embed')(text_ids)  # [B, L, D]
    pos = self.param('pos_embed', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, 'embed')), (self.max_len, self.width),
                     self.param_dtype)
    x = x + pos[None, :text_ids.shape[1]].astype(self.dtype)
    if self.type_vocab_size:
      x = x + embed(self.type_vocab_size, 'type_embed')(jnp.zeros_like(text_ids))
    if self.post_ln:
      x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_embed')(x)
    return x

  def _pooled_row(self, text_mask: jax.Array) -> jax.Array | None:
    """[B, 1] int: the position that the pool reads, or None for 'mean' (every row)."""
    batch, length = text_mask.shape
    if self.pool == 'eot':
      return eot_index(text_mask)[:, None]
    if self.pool in ('cls', 'last'):
      return jnp.full((batch, 1), 0 if self.pool == 'cls' else length - 1, jnp.int32)
    return None

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, deterministic: bool = True,
               pooled_only: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """text_ids: [B, L] int; text_mask: [B, L] bool, True for real tokens (incl. EOS)."""
    check_choice('model.text.pool', self.pool, POOLS)
    if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
      raise ValueError(f'Expected text_ids and text_mask shaped [batch, length], got '
                       f'{tuple(text_ids.shape)} and {tuple(text_mask.shape)}.')
    length = text_ids.shape[1]
    if length > self.max_len:
      raise ValueError(f'Text length {length} exceeds the {self.max_len} learned positions '
                       '(data.max_text_len).')
    x = nn.with_logical_constraint(self._embed(text_ids), ACTIVATION_AXES)  # [B, L, D]
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    mask = combine_masks(causal_mask(length) if self.causal else None,
                         padding_mask(text_mask) if self.mask_pad else None)  # [B|1, 1, L|1, L]
    rows = self._pooled_row(text_mask) if pooled_only else None  # [B, 1] or None
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.dropout_rate,
                self.layer_norm_eps, self.remat, self.scan_layers, self.dtype,
                self.param_dtype, norm_first=not self.post_ln,
                name='encoder')(x, mask, deterministic, rows)  # [B, L | 1, D]
    if not self.post_ln:
      x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')(x)
    if rows is not None:
      return x[:, 0], None
    if self.pool == 'eot':
      pooled = eot_pool(x, text_mask)
    elif self.pool == 'cls':
      pooled = cls_pool(x)
    elif self.pool == 'last':
      pooled = x[:, -1]
    else:
      pooled = mean_pool(x, text_mask)
    return pooled, x
