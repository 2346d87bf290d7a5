"""Image-text matching (ITM): hard-negative sampling from contrastive similarities (ALBEF)
and the binary matching loss.

For each image, a negative text is drawn from the other texts of the batch with probability
softmax(similarity) (so similar, i.e. hard, texts are drawn most often); likewise a negative
image for each text. Pairs whose texts are identical token sequences are never drawn: in
datasets with repeated captions they are not negatives at all.
"""
import jax
import jax.numpy as jnp

from vlm_jax.losses.contrastive import HIGHEST


def identical_rows(text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
  """[B, B] bool: True where rows i and j hold the same tokens (the diagonal included)."""
  ids = jnp.where(text_mask, text_ids, -1)  # padding compares equal only to padding
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def sample_hard_negatives(rng: jax.Array, image_emb: jax.Array, text_emb: jax.Array,
                          logit_scale: jax.Array, forbidden: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Draws one negative text per image and one negative image per text.

  Args:
    rng: PRNG key.
    image_emb, text_emb: [B, E] unit-norm embeddings; row i of each is a positive pair.
    logit_scale: [] the contrastive temperature's scale, sharpening the draw.
    forbidden: [B, B] bool, True where (image i, text j) must not be drawn; must include
      the diagonal (e.g. `identical_rows`).

  Returns:
    neg_text [B] int32 (the text drawn for image i), neg_text_valid [B] bool,
    neg_image [B] int32 (the image drawn for text j), neg_image_valid [B] bool. A row with
    no allowed candidate gets an arbitrary index and valid False.
  """
  sims = jnp.einsum('ie,te->it', image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                    precision=HIGHEST)
  logits = jax.lax.stop_gradient(logit_scale * sims)  # [B, B]
  masked = jnp.where(forbidden, -jnp.inf, logits)
  text_rng, image_rng = jax.random.split(rng)
  neg_text = jax.random.categorical(text_rng, masked, axis=1)  # [B] per image
  neg_image = jax.random.categorical(image_rng, masked, axis=0)  # [B] per text
  text_valid = ~jnp.all(forbidden, axis=1)
  image_valid = ~jnp.all(forbidden, axis=0)
  return neg_text, text_valid, neg_image, image_valid


def itm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted two-way cross-entropy of matching logits.

  Args:
    logits: [P, 2] float (index 1: the pair matches).
    labels: [P] int, 1 for matching pairs, 0 for negatives.
    weights: [P] float, 0 for pairs to ignore.

  Returns:
    (loss [], {'itm_accuracy': weighted accuracy []}).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  total = jnp.maximum(jnp.sum(weights), 1.0)
  correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
  return jnp.sum(nll * weights) / total, {'itm_accuracy': jnp.sum(correct * weights) / total}
