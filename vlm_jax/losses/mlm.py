"""Masked language modelling (BERT): masking of text tokens and the masked-token loss.

Of the maskable tokens (real tokens other than the first, BOS/CLS, and the last, EOS), each
is selected with probability p; a selected token becomes [MASK] with probability 0.8, a
uniformly random token with probability 0.1, and stays unchanged with probability 0.1. The
loss is the cross-entropy of the original token at the selected positions only.
"""
import jax
import jax.numpy as jnp


def maskable_positions(text_mask: jax.Array) -> jax.Array:
  """[B, L] bool: real tokens except the first (BOS/CLS) and the last real one (EOS)."""
  text_mask = text_mask.astype(bool)
  length = jnp.sum(text_mask, axis=1, keepdims=True)  # [B, 1]
  position = jnp.arange(text_mask.shape[1])[None, :]
  return text_mask & (position > 0) & (position < length - 1)


def mask_tokens(rng: jax.Array, text_ids: jax.Array, text_mask: jax.Array, *,
                mask_id: int, vocab_size: int, probability: float = 0.15
                ) -> tuple[jax.Array, jax.Array]:
  """BERT's 80/10/10 masking.

  Args:
    rng: PRNG key.
    text_ids: [B, L] int token ids; text_mask: [B, L] bool.
    mask_id: the [MASK] token id; vocab_size: V, the range of random replacements.
    probability: the chance that a maskable token is selected.

  Returns:
    masked_ids [B, L] int32 (the model's input) and targets [B, L] bool (the selected
    positions, where the loss is taken).
  """
  select_rng, action_rng, token_rng = jax.random.split(rng, 3)
  targets = maskable_positions(text_mask) & jax.random.bernoulli(
      select_rng, probability, text_ids.shape)
  action = jax.random.uniform(action_rng, text_ids.shape)
  random_ids = jax.random.randint(token_rng, text_ids.shape, 0, vocab_size, jnp.int32)
  masked = jnp.where(action < 0.8, mask_id, jnp.where(action < 0.9, random_ids, text_ids))
  return jnp.where(targets, masked, text_ids).astype(jnp.int32), targets


def mlm_loss(logits: jax.Array, text_ids: jax.Array, targets: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of the original tokens at the selected positions.

  Args:
    logits: [B, L, V] float; text_ids: [B, L] the original ids; targets: [B, L] bool.

  Returns:
    (loss [], {'mlm_accuracy': accuracy [] at the selected positions}); both 0 if no
    position is selected.
  """
  logits = logits.astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), text_ids[..., None], axis=-1)[..., 0]
  weights = targets.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == text_ids).astype(jnp.float32)
  return jnp.sum(nll * weights) / total, {'mlm_accuracy': jnp.sum(correct * weights) / total}
