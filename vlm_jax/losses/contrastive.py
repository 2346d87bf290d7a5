"""Contrastive image-text losses over a batch of paired embeddings, in float32.

Each loss takes L2-normalised embeddings image_emb [B, E] and text_emb [B, E] (row i of
each is a positive pair) and returns (loss, metrics). The logits and per-row terms are
separate functions so that sharded variants (a local block of rows against gathered or
ring-passed columns) can reuse them with an offset for the positives.
"""
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def pairwise_logits(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                    logit_bias: jax.Array | float = 0.0) -> jax.Array:
  """scale * <image_i, text_j> + bias: [Bi, E], [Bt, E] -> [Bi, Bt] float32."""
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  sims = jnp.einsum('ie,te->it', image_emb, text_emb, precision=HIGHEST)  # [Bi, Bt]
  return jnp.asarray(logit_scale, jnp.float32) * sims + jnp.asarray(logit_bias, jnp.float32)


def positive_mask(num_rows: int, num_cols: int, offset: int | jax.Array = 0) -> jax.Array:
  """[R, C] bool, True at (i, i + offset): the positives of rows [offset, offset + R)."""
  return jnp.arange(num_rows)[:, None] + offset == jnp.arange(num_cols)[None, :]


def softmax_xent_rows(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """-log softmax(logits)[positive] per row: [R, C], [R, C] bool (one True per row) -> [R]."""
  positive_logit = jnp.sum(jnp.where(positives, logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - positive_logit


def sigmoid_terms(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """-log sigmoid(z * logits), z = +1 on positives, -1 elsewhere: [R, C] -> [R, C]."""
  z = jnp.where(positives, 1.0, -1.0)
  return -jax.nn.log_sigmoid(z * logits)


def _accuracies(logits: jax.Array) -> dict[str, jax.Array]:
  labels = jnp.arange(logits.shape[0])
  return {'i2t_accuracy': jnp.mean(jnp.argmax(logits, axis=1) == labels),
          't2i_accuracy': jnp.mean(jnp.argmax(logits, axis=0) == labels)}


def softmax_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies.

  Args:
    image_emb: [B, E]; text_emb: [B, E]; logit_scale: scalar (already exp'd).

  Returns:
    (loss scalar float32, metrics: i2t_loss, t2i_loss, i2t_accuracy, t2i_accuracy).
  """
  logits = pairwise_logits(image_emb, text_emb, logit_scale)  # [B, B]
  positives = positive_mask(*logits.shape)
  i2t = jnp.mean(softmax_xent_rows(logits, positives))
  t2i = jnp.mean(softmax_xent_rows(logits.T, positives.T))
  loss = 0.5 * (i2t + t2i)
  return loss, {'i2t_loss': i2t, 't2i_loss': t2i, **_accuracies(logits)}


def sigmoid_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                        logit_bias: jax.Array, positives: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP's pairwise sigmoid loss: -(1/B) sum_ij log sigmoid(z_ij (scale <i, t> + bias)).

  Args:
    image_emb: [B, E]; text_emb: [B, E]; logit_scale, logit_bias: scalars.
    positives: [B, B] bool, the pairs with label z = +1; None = the diagonal (pair i, i).
      Marking every pair whose captions are identical as positive (`loss.positives=
      'same_text'`) removes the false negatives of datasets with repeated captions.

  Returns:
    (loss scalar float32, metrics: pos_loss, neg_loss (their per-image shares of the loss),
    i2t_accuracy, t2i_accuracy).
  """
  logits = pairwise_logits(image_emb, text_emb, logit_scale, logit_bias)  # [B, B]
  if positives is None:
    positives = positive_mask(*logits.shape)
  terms = sigmoid_terms(logits, positives)  # [B, B]
  batch = logits.shape[0]
  pos = jnp.sum(jnp.where(positives, terms, 0.0)) / batch
  neg = jnp.sum(jnp.where(positives, 0.0, terms)) / batch
  return pos + neg, {'pos_loss': pos, 'neg_loss': neg, **_accuracies(logits)}
