"""Masked language modelling (BERT): masking of text tokens and the masked-token loss.

Of the maskable tokens (real tokens other than the first, BOS/CLS, and the last, EOS), each
is selected with probability p, one number or one per vocabulary id (`token_probabilities`:
grounding words such as 'left' or 'red' masked more often than the rest); a selected token
becomes [MASK] with probability 0.8, a uniformly random token with probability 0.1, and
stays unchanged with probability 0.1. The loss is the cross-entropy of the original token at
the selected positions only.
"""
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def maskable_positions(text_mask: jax.Array) -> jax.Array:
  """[B, L] bool: real tokens except the first (BOS/CLS) and the last real one (EOS)."""
  text_mask = text_mask.astype(bool)
  length = jnp.sum(text_mask, axis=1, keepdims=True)  # [B, 1]
  position = jnp.arange(text_mask.shape[1])[None, :]
  return text_mask & (position > 0) & (position < length - 1)


def token_probabilities(vocab_size: int, probability: float,
                        word_classes: Iterable[tuple[float, Iterable[int]]] = ()) -> np.ndarray:
  """[V] float32 selection probability per token id: `probability`, raised to a class's
  probability for the ids of each (class probability, token ids) of `word_classes` (the
  larger wins where classes overlap)."""
  table = np.full(vocab_size, probability, np.float32)
  for class_probability, ids in word_classes:
    ids = np.asarray(list(ids), np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f'MLM word-class token ids must lie in [0, {vocab_size}), got '
                       f'{ids.min()}..{ids.max()}.')
    table[ids] = np.maximum(table[ids], class_probability)
  return table


def mask_tokens(rng: jax.Array, text_ids: jax.Array, text_mask: jax.Array, *,
                mask_id: int, vocab_size: int, probability: float | jax.Array = 0.15
                ) -> tuple[jax.Array, jax.Array]:
  """BERT's 80/10/10 masking.

  Args:
    rng: PRNG key.
    text_ids: [B, L] int token ids; text_mask: [B, L] bool.
    mask_id: the [MASK] token id; vocab_size: V, the range of random replacements.
    probability: the chance that a maskable token is selected: a number, or [V] per token
      id (`token_probabilities`).

  Returns:
    masked_ids [B, L] int32 (the model's input) and targets [B, L] bool (the selected
    positions, where the loss is taken).
  """
  select_rng, action_rng, token_rng = jax.random.split(rng, 3)
  if jnp.ndim(probability):
    probability = jnp.asarray(probability)[text_ids]  # [B, L]
  targets = maskable_positions(text_mask) & (
      jax.random.uniform(select_rng, text_ids.shape) < probability)
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
