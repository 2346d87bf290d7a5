"""Image-text matching evaluators: true caption vs a false one (relation, attribute and
position swaps, the ARO-style test), ITM accuracy, and retrieval re-ranked by a matching score.

All functions here take precomputed scores (cosine similarities of a dual encoder, or the
ITM logit differences of a fusion model), so they are pure NumPy and model-free.
"""
from collections.abc import Callable, Sequence

import numpy as np

from vlm_jax.data import shapes_text


def pair_accuracy(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
  """Fraction of pairs where the true caption scores strictly higher than its negative."""
  pos, neg = np.asarray(pos_scores, np.float64), np.asarray(neg_scores, np.float64)
  if pos.shape != neg.shape or pos.ndim != 1:
    raise ValueError(f'pos_scores and neg_scores must be [N] of one shape, got {pos.shape} '
                     f'and {neg.shape}.')
  return float(np.mean(pos > neg)) if len(pos) else float('nan')


def itm_accuracy(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
  """Binary ITM accuracy with the decision 'match' iff score > 0, over positives and
  negatives together."""
  pos, neg = np.asarray(pos_scores), np.asarray(neg_scores)
  correct = np.concatenate([pos > 0, neg <= 0])
  return float(np.mean(correct)) if len(correct) else float('nan')


def position_negatives(examples: dict) -> tuple[np.ndarray, list[str], list[str]]:
  """(index [P], true [P], false [P]) of the examples, one- and two-object, that have a
  caption naming a position: the first such caption, against its twin with every position
  word mirrored (`shapes_text.mirror_positions`: 'on the left' -> 'on the right', 'above'
  -> 'below')."""
  rows, trues, falses = [], [], []
  for i, (caps, objs) in enumerate(zip(examples['captions'], examples['objects'])):
    colors, shapes = [o['color'] for o in objs], [o['shape'] for o in objs]
    for caption in caps:
      mirrored = shapes_text.mirror_positions(caption, colors, shapes)
      if mirrored:
        rows.append(i)
        trues.append(caption)
        falses.append(mirrored)
        break
  return np.asarray(rows, np.int64), trues, falses


def swap_negatives(examples: dict) -> dict[str, tuple[np.ndarray, list[str], list[str]]]:
  """The examples' (index, true caption, false caption) for each swap kind.

  Returns:
    {'relation': (indices [R], true [R], false [R]), 'attribute': (...), 'position': (...)}:
    for two-object examples the false caption has the objects exchanged (relation) or their
    colours exchanged (attribute, only where the colours differ), the true caption being the
    canonical one (captions[0]); 'position' is `position_negatives` (one object or two).
  """
  out = {}
  for kind in ('relation', 'attribute'):
    rows, trues, falses = [], [], []
    for i, (caps, neg, objs) in enumerate(zip(examples['captions'], examples['hard_negative'],
                                              examples['objects'])):
      if not neg:
        continue
      if kind == 'attribute':
        neg = shapes_text.attribute_negative([o['color'] for o in objs],
                                             [o['shape'] for o in objs], neg)
        if not neg:
          continue
      rows.append(i)
      trues.append(caps[0])
      falses.append(neg)
    out[kind] = (np.asarray(rows, np.int64), trues, falses)
  out['position'] = position_negatives(examples)
  return out


def rerank_ranks(similarity: np.ndarray, positives: Callable[[int], Sequence[int]],
                 k: int, score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 chunk_pairs: int = 4096) -> np.ndarray:
  """Rank of each query's best positive after re-scoring its top-k candidates.

  The top-k candidates by `similarity` are re-ordered by `score_fn` (descending, ties by
  similarity order); candidates beyond k keep their order after them.

  Args:
    similarity: [Q, C] first-stage scores.
    positives: query index -> its positive candidate indices.
    k: how many candidates to re-score.
    score_fn: (query indices [P], candidate indices [P]) -> scores [P]; called on chunks
      of at most `chunk_pairs` pairs.

  Returns:
    [Q] int ranks (0 = first); k + (rank among the rest) when no positive is in the top k.
  """
  similarity = np.asarray(similarity)
  num_queries, num_cands = similarity.shape
  k = min(k, num_cands)
  order = np.argsort(-similarity, axis=1, kind='stable')  # [Q, C]
  top = order[:, :k]  # [Q, k]
  queries = np.repeat(np.arange(num_queries), k)
  pairs = top.reshape(-1)
  scores = np.concatenate([  # in chunks, so that callers may gather per-pair inputs
      np.asarray(score_fn(queries[s:s + chunk_pairs], pairs[s:s + chunk_pairs]))
      for s in range(0, len(pairs), chunk_pairs)])
  reranked = np.take_along_axis(top, np.argsort(-scores.reshape(num_queries, k), axis=1,
                                                kind='stable'), axis=1)
  full = np.concatenate([reranked, order[:, k:]], axis=1)
  ranks = np.empty(num_queries, np.int64)
  for q in range(num_queries):
    hits = np.flatnonzero(np.isin(full[q], np.asarray(positives(q))))
    ranks[q] = hits[0] if len(hits) else num_cands
  return ranks


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  return {k: float(np.mean(ranks < k)) for k in ks}
