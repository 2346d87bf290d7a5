"""BLIP-2 stage 1's image-text contrastive loss (ITC) over query embeddings.

BLIP-2 embeds an image as Q query embeddings [Q, E] and a text as one [E]; their similarity
is the highest of the Q query-text cosines, and the loss is the symmetric InfoNCE of those
similarities, label-smoothed (BLIP-2: 0.1). Hard negatives for image-text matching are drawn
from the same similarities (`sample_hard_negatives`).
"""
import jax
import jax.numpy as jnp

from vlm_jax.losses import captioning
from vlm_jax.losses import matching
from vlm_jax.losses.contrastive import HIGHEST


def query_max_similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """max over queries of <image_emb[i, q], text_emb[t]>: [Bi, Q, E], [Bt, E] -> [Bi, Bt]
  float32."""
  if image_emb.ndim != 3 or text_emb.ndim != 2:
    raise ValueError(f'Expected query embeddings [B, Q, E] and text embeddings [B, E], got '
                     f'{image_emb.shape} and {text_emb.shape}.')
  sims = jnp.einsum('iqe,te->itq', image_emb.astype(jnp.float32),
                    text_emb.astype(jnp.float32), precision=HIGHEST)
  return jnp.max(sims, axis=-1)


def query_max_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                          label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE of the query-max similarities, with label smoothing.

  Args:
    image_emb: [B, Q, E] unit-norm query embeddings; text_emb: [B, E] unit norm (row i of
      each is a positive pair).
    logit_scale: [] (already exp'd; BLIP-2 divides by a temperature of 0.07 at init).
    label_smoothing: e in [0, 1): targets (1 - e) on the positive plus e / B on every column.

  Returns:
    (loss [] float32, metrics i2t_loss, t2i_loss, i2t_accuracy, t2i_accuracy).
  """
  logits = jnp.asarray(logit_scale, jnp.float32) * query_max_similarity(image_emb, text_emb)
  labels = jnp.arange(logits.shape[0])[None]  # [1, B]: one "sequence" of B rows
  weights = jnp.ones(labels.shape, bool)
  i2t, i2t_metrics = captioning.caption_loss(logits[None], labels, weights, label_smoothing)
  t2i, t2i_metrics = captioning.caption_loss(logits.T[None], labels, weights, label_smoothing)
  return 0.5 * (i2t + t2i), {'i2t_loss': i2t, 't2i_loss': t2i,
                             'i2t_accuracy': i2t_metrics['accuracy'],
                             't2i_accuracy': t2i_metrics['accuracy']}


def sample_hard_negatives(rng: jax.Array, image_emb: jax.Array, text_emb: jax.Array,
                          logit_scale: jax.Array, forbidden: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`matching.sample_hard_negatives` for query embeddings image_emb [B, Q, E]: a negative
  text per image and a negative image per text, drawn with probability softmax(scale *
  query-max similarity) among the pairs not `forbidden` [B, B]. Same returns."""
  sims = query_max_similarity(image_emb, text_emb)  # [B, B]
  # The matching sampler scores its first argument's rows against its second's: the rows of
  # `sims` against the identity give back `sims` exactly (products by 1 and 0).
  return matching.sample_hard_negatives(rng, sims, jnp.eye(sims.shape[1], dtype=sims.dtype),
                                        logit_scale, forbidden)
