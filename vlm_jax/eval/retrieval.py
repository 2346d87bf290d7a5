"""Image-text retrieval metrics over precomputed embeddings.

Everything here is a pure function of embeddings: no model, no dataset. Inputs may be
NumPy or JAX arrays of any float dtype; they are cast to float32, L2-normalised, and
compared by cosine similarity (matmuls at `Precision.HIGHEST`, so accelerators do not
silently drop to bf16/TF32). Metrics come back as Python floats.

Ranking and ties: candidates are ordered by descending similarity, and candidates with
exactly equal similarity by ascending index -- the order of a stable sort of `-scores`
and of `jax.lax.top_k`. The rank of a candidate is therefore

  rank(j) = #{i : s_i > s_j} + #{i < j : s_i == s_j},

and a query is a hit at k when the rank of its best positive candidate is < k. Results
depend only on the scores, so they do not change with `chunk_size`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = np.ndarray | jax.Array

DEFAULT_CHUNK_SIZE = 1024
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: Array, eps: float = 1e-12) -> jax.Array:
  """Scales the rows of `x` [..., E] to unit L2 norm (zero rows stay zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_embeddings(name: str, x: Array) -> np.ndarray:
  """Returns `x` as a host float32 [N, E] array, or raises ValueError naming `name`."""
  shape = tuple(np.shape(x))
  if len(shape) != 2:
    raise ValueError(f'{name} must be 2-D [N, E], got shape {shape}.')
  if 0 in shape:
    raise ValueError(f'{name} must be non-empty, got shape {shape}.')
  x = np.asarray(x, np.float32)
  if not np.isfinite(x).all():
    raise ValueError(f'{name} (shape {shape}) contains NaN or infinite values.')
  return x


def check_same_dim(**named: np.ndarray) -> None:
  """Raises ValueError unless all named [N, E] arrays share the embedding size E."""
  if len({x.shape[-1] for x in named.values()}) > 1:
    shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in named.items())
    raise ValueError(f'Embedding sizes (last axis) differ: {shapes}.')


def check_indices(name: str, x: Array, length: int, upper: int) -> np.ndarray:
  """Returns `x` as an int32 [length] array with values in [0, upper), or raises."""
  x = np.asarray(x)
  if x.shape != (length,):
    raise ValueError(f'{name} must have shape ({length},), got shape {x.shape}.')
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'{name} must hold integers, got dtype {x.dtype}.')
  if length and (x.min() < 0 or x.max() >= upper):
    raise ValueError(f'{name} values must lie in [0, {upper}), got range '
                     f'[{x.min()}, {x.max()}].')
  return x.astype(np.int32)


def _check_chunk_size(chunk_size: int) -> int:
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive integer, got {chunk_size!r}.')
  return int(chunk_size)


@jax.jit
def _chunk_ranks(queries: jax.Array, cands: jax.Array, query_keys: jax.Array,
                 cand_keys: jax.Array) -> jax.Array:
  """Rank of each query's best positive candidate (see the module docstring).

  Args:
    queries: [c, E] query embeddings.
    cands: [K, E] candidate embeddings.
    query_keys: [c] int; candidate j is positive for query q iff keys match.
    cand_keys: [K] int.

  Returns:
    [c] int32 ranks in [0, K); K for a query without any positive candidate.
  """
  num_cands = cands.shape[0]
  queries, cands = l2_normalize(queries), l2_normalize(cands)
  sims = jnp.matmul(queries, cands.T, precision=_HIGHEST)  # [c, K]
  is_pos = query_keys[:, None] == cand_keys[None, :]  # [c, K]
  pos_sims = jnp.where(is_pos, sims, -jnp.inf)  # [c, K]
  best = jnp.max(pos_sims, axis=1, keepdims=True)  # [c, 1]
  best_idx = jnp.argmax(pos_sims, axis=1)[:, None]  # [c, 1], first of equals
  idx = jnp.arange(num_cands)[None, :]  # [1, K]
  ahead = (sims > best) | ((sims == best) & (idx < best_idx))  # [c, K]
  ranks = ahead.sum(axis=1, dtype=jnp.int32)  # [c]
  return jnp.where(is_pos.any(axis=1), ranks, num_cands)


def _positive_ranks(queries: np.ndarray, cands: np.ndarray, query_keys: np.ndarray,
                    cand_keys: np.ndarray, chunk_size: int) -> np.ndarray:
  """`_chunk_ranks` over query chunks of one fixed size (so one compilation)."""
  num_queries = queries.shape[0]
  chunk = min(chunk_size, num_queries)
  pad = -num_queries % chunk
  queries = np.pad(queries, ((0, pad), (0, 0)))  # [Q + pad, E]
  query_keys = np.pad(query_keys, (0, pad), constant_values=-1)  # [Q + pad]
  cands, cand_keys = jnp.asarray(cands), jnp.asarray(cand_keys)  # Sent once.
  ranks = [
      _chunk_ranks(queries[i:i + chunk], cands, query_keys[i:i + chunk], cand_keys)
      for i in range(0, num_queries + pad, chunk)
  ]
  return np.concatenate([np.asarray(r) for r in ranks])[:num_queries]


def positive_ranks(query_emb: Array, cand_emb: Array, query_keys: Array,
                   cand_keys: Array, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Rank of each query's best-scoring positive candidate under cosine similarity.

  Candidate j is a positive for query q iff `query_keys[q] == cand_keys[j]`. Ties are
  broken by candidate index (module docstring). Memory is O(chunk_size * K).

  Args:
    query_emb: [Q, E] query embeddings.
    cand_emb: [K, E] candidate embeddings.
    query_keys: [Q] non-negative int keys of the queries.
    cand_keys: [K] non-negative int keys of the candidates.
    chunk_size: number of queries scored at once.

  Returns:
    [Q] int32 ranks in [0, K); K for queries without a positive candidate.
  """
  queries = check_embeddings('query_emb', query_emb)
  cands = check_embeddings('cand_emb', cand_emb)
  check_same_dim(query_emb=queries, cand_emb=cands)
  info = np.iinfo(np.int32)
  query_keys = check_indices('query_keys', query_keys, queries.shape[0], info.max)
  cand_keys = check_indices('cand_keys', cand_keys, cands.shape[0], info.max)
  return _positive_ranks(queries, cands, query_keys, cand_keys,
                         _check_chunk_size(chunk_size))


def retrieval_metrics(image_emb: Array, text_emb: Array, text_to_image: Array,
                      ks: Sequence[int] = (1, 5, 10), *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, float]:
  """Recall@k for image->text and text->image retrieval.

  Image->text: an image is a hit at k if ANY of its captions is among its top-k texts;
  images without captions (pure distractors) are left out of the i2t average.
  Text->image: a caption is a hit at k if its own image is among its top-k images.

  Args:
    image_emb: [N, E] image embeddings.
    text_emb: [M, E] caption embeddings.
    text_to_image: [M] int, index of each caption's image in [0, N).
    ks: the cut-offs k >= 1.
    chunk_size: queries scored at once; memory is O(chunk_size * max(N, M)) and the
      results do not depend on it.

  Returns:
    {'i2t_recall@k': float, ..., 't2i_recall@k': float, ...} for each k in `ks`.
  """
  images = check_embeddings('image_emb', image_emb)
  texts = check_embeddings('text_emb', text_emb)
  check_same_dim(image_emb=images, text_emb=texts)
  num_images, num_texts = images.shape[0], texts.shape[0]
  text_to_image = check_indices('text_to_image', text_to_image, num_texts, num_images)
  ks = tuple(ks)
  if not ks or any(int(k) != k or k < 1 for k in ks):
    raise ValueError(f'ks must be positive integers, got {ks!r}.')
  chunk_size = _check_chunk_size(chunk_size)

  image_ids = np.arange(num_images, dtype=np.int32)
  i2t = _positive_ranks(images, texts, image_ids, text_to_image, chunk_size)  # [N]
  i2t = i2t[np.bincount(text_to_image, minlength=num_images) > 0]
  t2i = _positive_ranks(texts, images, text_to_image, image_ids, chunk_size)  # [M]
  metrics = {f'i2t_recall@{k}': float(np.mean(i2t < k)) for k in ks}
  metrics.update({f't2i_recall@{k}': float(np.mean(t2i < k)) for k in ks})
  return metrics


def hard_negative_accuracy(image_emb: Array, pos_text_emb: Array,
                           neg_text_emb: Array) -> dict[str, float]:
  """Fraction of images whose true caption beats its hard negative (cosine).

  A tie counts as a failure: the true caption must score strictly higher.

  Args:
    image_emb: [N, E] image embeddings.
    pos_text_emb: [N, E] embedding of each image's true caption.
    neg_text_emb: [N, E] embedding of each image's hard-negative caption.

  Returns:
    {'relation_accuracy': float}.
  """
  images = check_embeddings('image_emb', image_emb)
  pos = check_embeddings('pos_text_emb', pos_text_emb)
  neg = check_embeddings('neg_text_emb', neg_text_emb)
  if not images.shape == pos.shape == neg.shape:
    raise ValueError(
        'image_emb, pos_text_emb and neg_text_emb must have the same shape [N, E], got '
        f'{tuple(images.shape)}, {tuple(pos.shape)} and {tuple(neg.shape)}.')
  return {'relation_accuracy': float(_pos_beats_neg(images, pos, neg))}


@jax.jit
def _pos_beats_neg(images: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Mean over N of [cos(image, pos) > cos(image, neg)]; inputs [N, E]."""
  images, pos, neg = l2_normalize(images), l2_normalize(pos), l2_normalize(neg)
  pos_sims = jnp.sum(images * pos, axis=-1)  # [N]
  neg_sims = jnp.sum(images * neg, axis=-1)  # [N]
  return jnp.mean(pos_sims > neg_sims)
