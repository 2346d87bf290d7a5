"""Fusion encoder (ALBEF, BLIP, ViLT, Flamingo-style, BLIP-2-style): a dual encoder whose
towers' tokens also meet in a fusion layer, with image-text matching and MLM heads.

The dual encoder gives the global embeddings of the contrastive objective and of retrieval;
the fusion layer (`vlm_jax.fusion`) gives text-aligned fused tokens [B, L, D], pooled for
the ITM head and read token by token by the vocabulary ('MLM') head, which also predicts the
next token of a causal fused stream (the fusion `caption` objective). The model returns
named outputs and knows nothing of losses: `vlm_jax.training.objectives` composes them.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.models.dual_encoder import DualEncoder
from vlm_jax.nn.pooling import eot_pool, mean_pool
from vlm_jax.nn.transformer import dense, layer_norm

Dtype = Any
POOLS = ('first', 'eot', 'mean')


class FusionEncoder(nn.Module):
  """A `DualEncoder` plus a fusion layer and its heads.

  Attributes:
    dual: the dual encoder (towers, projections, temperature).
    fusion: `(image_tokens [B, N, Di], image_mask, text_tokens [B, L, Dt], text_mask,
      deterministic) -> [B, L, D]`.
    vocab_size: V, for the MLM head.
    width: D, the fused tokens' width (of the MLM head's transform).
    pool: ITM pooling of the fused tokens: 'first' (the BOS/CLS position), 'eot' (the last
      real token, for causal fusion) or 'mean'.
    itm, mlm: which heads exist.
  """
  dual: DualEncoder
  fusion: nn.Module
  vocab_size: int
  width: int
  pool: str = 'first'
  itm: bool = True
  mlm: bool = True
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    check_choice('model.fusion.pool', self.pool, POOLS)
    if self.itm:
      self.itm_head = nn.Dense(2, dtype=jnp.float32, param_dtype=self.param_dtype,
                               name='itm_head')
    if self.mlm:
      self.mlm_transform = nn.Dense(self.width, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name='mlm_transform')
      self.mlm_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'mlm_norm')
      self.mlm_decoder = dense(self.vocab_size, ('embed', 'vocab'), jnp.float32,
                               self.param_dtype, 'mlm_decoder')

  # The dual encoder's interface, so that every evaluator of dual encoders applies.
  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> [B, E] float32, unit norm."""
    return self.dual.encode_image(images, deterministic)

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """ids [B, L], mask [B, L] -> [B, E] float32, unit norm."""
    return self.dual.encode_text(text_ids, text_mask, deterministic)

  def embed(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
            deterministic: bool = True) -> dict[str, jax.Array]:
    """The dual encoder's outputs plus both towers' tokens.

    Returns:
      image_emb, text_emb [B, E]; logit_scale, logit_bias []; image_tokens [B, N, Di];
      text_tokens [B, L, Dt].
    """
    image_emb, image_tokens = self.dual.encode_image_tokens(images, deterministic)
    text_emb, text_tokens = self.dual.encode_text_tokens(text_ids, text_mask, deterministic)
    return dict(image_emb=image_emb, text_emb=text_emb, logit_scale=self.dual.logit_scale(),
                logit_bias=self.dual.logit_bias(), image_tokens=image_tokens,
                text_tokens=text_tokens)

  def text_tokens(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """The text tower's tokens alone (e.g. of masked text for MLM): [B, L, Dt]."""
    return self.dual.encode_text_tokens(text_ids, text_mask, deterministic)[1]

  def fuse(self, image_tokens: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
           deterministic: bool = True) -> jax.Array:
    """[B, N, Di] and [B, L, Dt] -> fused text-aligned tokens [B, L, D]."""
    return self.fusion(image_tokens, None, text_tokens, text_mask, deterministic=deterministic)

  def itm_logits(self, fused: jax.Array, text_mask: jax.Array) -> jax.Array:
    """Fused tokens [B, L, D] -> [B, 2] float32 logits (index 1: the pair matches)."""
    if self.pool == 'first':
      pooled = fused[:, 0]
    elif self.pool == 'eot':
      pooled = eot_pool(fused, text_mask)
    else:
      pooled = mean_pool(fused, text_mask)
    return self.itm_head(pooled.astype(jnp.float32))

  def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Evaluation: [B, H, W, 3] -> (embedding [B, E], image tokens [B, N, Di])."""
    return self.dual.encode_image_tokens(images)

  def text_features(self, text_ids: jax.Array, text_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Evaluation: ids, mask [B, L] -> (embedding [B, E], text tokens [B, L, Dt])."""
    return self.dual.encode_text_tokens(text_ids, text_mask)

  def match_score(self, image_tokens: jax.Array, text_tokens: jax.Array,
                  text_mask: jax.Array) -> jax.Array:
    """Evaluation: the ITM logit difference (match - no match) of each pair of tower
    tokens [B, N, Di], [B, L, Dt]: [B] float32."""
    logits = self.itm_logits(self.fuse(image_tokens, text_tokens, text_mask), text_mask)
    return logits[:, 1] - logits[:, 0]

  def mlm_logits(self, fused: jax.Array) -> jax.Array:
    """Fused tokens [B, L, D] -> [B, L, V] float32 vocabulary logits."""
    h = nn.gelu(self.mlm_transform(fused), approximate=False)
    return self.mlm_decoder(self.mlm_norm(h).astype(jnp.float32))

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """`embed`'s outputs plus, for the matched pairs, `fused` [B, L, D], `itm_logits`
    [B, 2] and `mlm_logits` [B, L, V] (those of existing heads); every parameter is used,
    so `init` through this method creates them all."""
    outputs = self.embed(images, text_ids, text_mask, deterministic)
    fused = self.fuse(outputs['image_tokens'], outputs['text_tokens'], text_mask,
                      deterministic)
    outputs['fused'] = fused
    if self.itm:
      outputs['itm_logits'] = self.itm_logits(fused, text_mask)
    if self.mlm:
      outputs['mlm_logits'] = self.mlm_logits(fused)
    return outputs
