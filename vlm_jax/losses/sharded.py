"""Contrastive losses over a batch split across devices, run inside `jax.shard_map` or `jax.pmap`.

Each function takes the LOCAL shards image_emb [b, E] and text_emb [b, E] of a global batch
of B = n * b pairs (n = the size of `axis_name`, a mesh axis name or a tuple of them; shard
i holds global rows [i * b, (i + 1) * b)) and returns the dense global loss of
`vlm_jax.losses.contrastive` with its metrics, identical on every device.

Gradients. Totals are combined with `lax.psum`, so:
  * in `jax.shard_map` (with or without `check_vma`), gradients w.r.t. the local inputs are
    those of the global loss, and a replicated (`P()`) input such as logit_scale gets the
    full gradient: differentiate the returned loss as it is, never `pmean` the gradients.
  * in `jax.pmap`, whose `psum` transposes to a `psum`, every device's gradient is n times
    the contribution of its own computation; `lax.pmean` of the per-device gradients over
    `axis_name` is the single-device gradient (as for a local-mean loss, so one driver rule
    serves both).
"""
import functools

import jax
import jax.numpy as jnp

from vlm_jax.losses.contrastive import (
    HIGHEST, pairwise_logits, positive_mask, softmax_xent_rows)

AxisName = str | tuple[str, ...]
Metrics = dict[str, jax.Array]

# Widest column block of `sigmoid_contrastive_chunked` (config `loss.block_size`).
DEFAULT_BLOCK_SIZE = 256


def _global_mean(local_total: jax.Array, axis_name: AxisName, batch: int) -> jax.Array:
  """sum over devices of a per-device total, divided by the global batch: [] -> []."""
  return jax.lax.psum(local_total, axis_name) / batch


def _shard_geometry(axis_name: AxisName) -> tuple[int, jax.Array]:
  """(number of shards n, this shard's index) along `axis_name`."""
  return jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)


def _softmax_half(queries: jax.Array, keys: jax.Array, logit_scale: jax.Array,
                  offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Local query rows [b, E] against all keys [B, E], positives at offset + row.

  Returns:
    (sum of the b cross-entropies [], number of rows whose argmax is the positive []).
  """
  logits = pairwise_logits(queries, keys, logit_scale)  # [b, B]
  positives = positive_mask(*logits.shape, offset)
  total = jnp.sum(softmax_xent_rows(logits, positives))
  labels = offset + jnp.arange(logits.shape[0])
  hits = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
  return total, hits


def softmax_contrastive_sharded(image_emb: jax.Array, text_emb: jax.Array,
                                logit_scale: jax.Array, *, axis_name: AxisName
                                ) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE over the global batch; local rows against gathered columns.

  Local images score all texts (image->text half) and local texts score all images
  (text->image half); the gathers are differentiated through, so the text (image) shards
  also receive the gradient of the other devices' rows. Memory per device: [b, B] logits.

  Args:
    image_emb: [b, E] local shard; text_emb: [b, E] local shard; logit_scale: scalar
      (already exp'd); axis_name: the mesh axis (or tuple of axes) the batch is split over.

  Returns:
    (global loss [], metrics i2t_loss, t2i_loss, i2t_accuracy, t2i_accuracy), equal to
    `softmax_contrastive` on the gathered batch and identical on every device.
  """
  n, index = _shard_geometry(axis_name)
  batch = n * image_emb.shape[0]
  offset = index * image_emb.shape[0]
  all_text = jax.lax.all_gather(text_emb, axis_name, tiled=True)  # [B, E]
  all_image = jax.lax.all_gather(image_emb, axis_name, tiled=True)  # [B, E]
  i2t_total, i2t_hits = _softmax_half(image_emb, all_text, logit_scale, offset)
  t2i_total, t2i_hits = _softmax_half(text_emb, all_image, logit_scale, offset)
  i2t = _global_mean(i2t_total, axis_name, batch)
  t2i = _global_mean(t2i_total, axis_name, batch)
  metrics = {'i2t_loss': i2t, 't2i_loss': t2i,
             'i2t_accuracy': _global_mean(i2t_hits, axis_name, batch),
             't2i_accuracy': _global_mean(t2i_hits, axis_name, batch)}
  return 0.5 * (i2t + t2i), metrics


def _best(best: tuple[jax.Array, jax.Array], block_max: jax.Array, block_arg: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """Running (max [b], global argmax [b]) updated with one block's; earlier wins ties."""
  better = block_max > best[0]
  return jnp.where(better, block_max, best[0]), jnp.where(better, block_arg, best[1])


def _column_block_size(num_cols: int, block_size: int) -> int:
  """The largest divisor of `num_cols` that is <= `block_size` (>= 1)."""
  if block_size < 1:
    raise ValueError(f'block_size must be a positive integer, got {block_size}.')
  return max(c for c in range(1, min(num_cols, block_size) + 1) if num_cols % c == 0)


def _sigmoid_block(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                   logit_bias: jax.Array, offset: jax.Array, width: int):
  """One [b, c] block of the sigmoid loss, every pair scored as a negative.

  No positive mask: one built from `offset` alone would be computed outside the
  rematerialisation and saved for the backward pass, a [b, c] residual per block (see
  `_positive_pairs` for the diagonal). The block's texts are sliced here, inside the
  rematerialised function, so that the backward pass keeps only the whole chunk.

  Args:
    image_emb: [b, E]; text_emb: [b, E] the chunk; logit_scale, logit_bias: scalars;
    offset: [] int32, the block's first column; width: c, the number of columns.

  Returns:
    (sum of the b * c negative terms [], row max [b], row argmax [b], column max [c],
    column argmax [c]); the row argmax is an index in the chunk, the column argmax a local
    image index, and the max statistics carry no gradient.
  """
  text_emb = jax.lax.dynamic_slice_in_dim(text_emb, offset, width)  # [c, E]
  logits = pairwise_logits(image_emb, text_emb, logit_scale, logit_bias)  # [b, c]
  neg = jnp.sum(-jax.nn.log_sigmoid(-logits))  # sigmoid_terms with no positives
  stats = jax.lax.stop_gradient(logits)
  return (neg, jnp.max(stats, axis=1), jnp.argmax(stats, axis=1) + offset,
          jnp.max(stats, axis=0), jnp.argmax(stats, axis=0))


def _positive_pairs(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                    logit_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The b positive pairs (i, i) of the diagonal chunk: [b, E], [b, E] -> ([], []).

  Returns:
    (sum of their positive terms, sum of the negative terms `_sigmoid_block` gave them).
  """
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  sims = jnp.einsum('ie,ie->i', image_emb, text_emb, precision=HIGHEST)  # [b]
  logits = (jnp.asarray(logit_scale, jnp.float32) * sims
            + jnp.asarray(logit_bias, jnp.float32))
  return jnp.sum(-jax.nn.log_sigmoid(logits)), jnp.sum(-jax.nn.log_sigmoid(-logits))


def _sigmoid_chunk(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                   logit_bias: jax.Array, *, block_size: int):
  """The local images against one text chunk, all pairs as negatives, in column blocks.

  A `lax.scan` over the c-wide column blocks of the chunk (c: the largest divisor of b that
  is <= `block_size`); each block is rematerialised in the backward pass, so at most one
  [b, c] block of logits (and its gradient) is live, never the [b, b] of the whole chunk.

  Args:
    image_emb: [b, E]; text_emb: [b, E] the chunk; logit_scale, logit_bias: scalars;
    block_size: the widest column block to score at once.

  Returns:
    (sum of the b * b negative terms [], row max [b], row argmax [b] (index in the chunk),
    column max [b], column argmax [b] (local image index)); no gradient on the statistics.
  """
  b = text_emb.shape[0]
  c = _column_block_size(b, block_size)
  block = jax.checkpoint(functools.partial(_sigmoid_block, width=c))

  def step(carry, offset):
    neg, rows = carry
    block_neg, r_max, r_arg, c_max, c_arg = block(image_emb, text_emb, logit_scale,
                                                  logit_bias, offset)
    return (neg + block_neg, _best(rows, r_max, r_arg)), (c_max, c_arg)

  # Initial values made from an input (`full_like`), so that in shard_map they have its
  # device variance, as the scan's carry must; a constant would not.
  column = image_emb[:, 0].astype(jnp.float32)  # [b]
  rows = (jnp.full_like(column, -jnp.inf), jnp.zeros_like(column, jnp.int32))
  (neg, rows), (col_max, col_arg) = jax.lax.scan(
      step, (jnp.zeros_like(column[0]), rows), jnp.arange(0, b, c, dtype=jnp.int32))
  return neg, rows[0], rows[1], col_max.reshape(b), col_arg.reshape(b)


def sigmoid_contrastive_chunked(image_emb: jax.Array, text_emb: jax.Array,
                                logit_scale: jax.Array, logit_bias: jax.Array, *,
                                axis_name: AxisName, block_size: int = DEFAULT_BLOCK_SIZE
                                ) -> tuple[jax.Array, Metrics]:
  """SigLIP's sigmoid loss over the global batch, text chunks passed around a ring.

  Step 0 scores the local images against the local texts (positives on the diagonal);
  then, n - 1 times, every device hands its current text chunk, with the chunk's index, to
  the previous device of a ring (`ppermute`) and scores the chunk it receives: negatives
  only. The index travels with the chunk because `ppermute` over a tuple of axes numbers
  devices in mesh-axis order, which need not be the order of `axis_index`. Each [b, b]
  chunk is scored in column blocks of c <= `block_size` texts, each rematerialised in the
  backward pass, so a device only ever holds one [b, c] block of logits plus the n visited
  [b, E] chunks: O(b c + B E) memory, linear in the global batch B at a fixed device count.

  Args:
    image_emb: [b, E] local shard; text_emb: [b, E] local shard; logit_scale, logit_bias:
      scalars; axis_name: the mesh axis (or tuple of axes) the batch is split over;
      block_size: the widest column block scored at once; the width used is the largest
      divisor of b that is <= block_size (b itself when b <= block_size; a b with no
      divisor near block_size, e.g. a prime, gives narrow blocks: exact but slower).

  Returns:
    (global loss [], metrics pos_loss, neg_loss, i2t_accuracy, t2i_accuracy), equal to
    `sigmoid_contrastive` on the gathered batch (sum of all B x B terms / B).
  """
  b = image_emb.shape[0]
  n, index = _shard_geometry(axis_name)
  ring = [(j, (j - 1) % n) for j in range(n)]
  chunk = functools.partial(_sigmoid_chunk, block_size=block_size)

  # Step 0 scores all b * b local pairs as negatives, then moves the diagonal to positives.
  pos, pair_neg = _positive_pairs(image_emb, text_emb, logit_scale, logit_bias)
  neg, row_max, row_arg, col_max, col_arg = chunk(image_emb, text_emb, logit_scale,
                                                  logit_bias)
  neg = neg - pair_neg
  rows = (row_max, row_arg + index * b)  # best text per local image, global text index
  cols = (col_max, col_arg + index * b)  # best image per held text, global image index

  def step(carry, _):
    text, source, cols, neg, rows = carry
    text, source, cols = jax.lax.ppermute((text, source, cols), axis_name, ring)
    chunk_neg, r_max, r_arg, c_max, c_arg = chunk(image_emb, text, logit_scale, logit_bias)
    rows = _best(rows, r_max, r_arg + source * b)
    cols = _best(cols, c_max, c_arg + index * b)
    return (text, source, cols, neg + chunk_neg, rows), None

  carry = (text_emb, index, cols, neg, rows)
  (_, held, cols, neg, rows), _ = jax.lax.scan(step, carry, None, length=n - 1)
  i2t_hits = jnp.sum(rows[1] == index * b + jnp.arange(b))
  t2i_hits = jnp.sum(cols[1] == held * b + jnp.arange(b))
  batch = n * b
  pos = _global_mean(pos, axis_name, batch)
  neg = _global_mean(neg, axis_name, batch)
  metrics = {'pos_loss': pos, 'neg_loss': neg,
             'i2t_accuracy': _global_mean(i2t_hits, axis_name, batch),
             't2i_accuracy': _global_mean(t2i_hits, axis_name, batch)}
  return pos + neg, metrics
