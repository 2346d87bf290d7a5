"""Captioning (next-token prediction): shifted targets and label-smoothed cross-entropy.

Rows of token ids are `[BOS] tokens [EOS] [PAD]...`; the model reads the whole row and its
logits at position t predict the token at t + 1, so the targets are the ids shifted left by
one and the loss covers every real token after BOS (EOS included). A prefix LM (VQA: loss on
the answer only) passes its own `loss_mask` over the ids.
"""
import jax
import jax.numpy as jnp


def next_token_targets(text_ids: jax.Array, loss_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Targets of the logits at each position of `text_ids`.

  Args:
    text_ids: [B, L] int, the model's input.
    loss_mask: [B, L] bool over the ids: the tokens to predict (the text mask for
      captions, which makes BOS the only real token not predicted).

  Returns:
    targets [B, L] int32 (text_ids[:, t + 1]; 0 at the last position) and weights [B, L]
    bool (loss_mask[:, t + 1]; False at the last position).
  """
  if text_ids.shape != loss_mask.shape or text_ids.ndim != 2:
    raise ValueError(f'text_ids {text_ids.shape} and loss_mask {loss_mask.shape} must both be '
                     '[batch, length].')
  pad = lambda x, value: jnp.concatenate(
      [x[:, 1:], jnp.full((x.shape[0], 1), value, x.dtype)], axis=1)
  return pad(text_ids.astype(jnp.int32), 0), pad(loss_mask.astype(bool), False)


def caption_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the weighted positions, with label smoothing.

  With smoothing e, the target distribution is (1 - e) on the target token plus e / V on
  every token (so e / V more on the target): loss = -sum_v q_v log p_v.

  Args:
    logits: [B, L, V] float; targets: [B, L] int; weights: [B, L] bool or float.
    label_smoothing: e in [0, 1).

  Returns:
    (loss [], {'accuracy': argmax accuracy [] over the weighted positions}); both 0 when
    no position is weighted.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}.')
  if logits.shape[:2] != targets.shape or targets.shape != weights.shape:
    raise ValueError(f'logits {logits.shape}, targets {targets.shape} and weights '
                     f'{weights.shape} do not agree on [batch, length].')
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits)  # [B, L, V]
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
  weights = weights.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(weights), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights) / total, {'accuracy': jnp.sum(correct * weights) / total}
