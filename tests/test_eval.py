"""Tests for vlm_jax.eval: zero-shot and retrieval metrics on hand-made embeddings."""

import numpy as np
import pytest

from vlm_jax import eval as vlm_eval


def _rows_with_ranks(targets, ranks, num_cands):
  """[Q, K] rows in which candidate targets[q] is exactly at position ranks[q].

  Scores are distinct positive integers, so with one-hot candidates (identity) the
  cosine ranking of row q is fixed by construction.
  """
  rows = np.zeros((len(targets), num_cands), np.float32)
  for q, (target, rank) in enumerate(zip(targets, ranks)):
    order = [j for j in range(num_cands) if j != target]
    order.insert(rank, target)
    rows[q, order] = np.arange(num_cands, 0, -1)
  return rows


def _reference_ranks(queries, cands, is_pos):
  """NumPy reference: position of the first positive in a stable descending sort."""
  sims = queries @ cands.T  # [Q, K]
  ranks = []
  for q in range(len(queries)):
    order = np.argsort(-sims[q], kind='stable')
    hits = np.flatnonzero(is_pos[q][order])
    ranks.append(hits[0] if hits.size else len(cands))
  return np.array(ranks)


def _dyadic_unit_vectors(rng, n, dim=16):
  """Unit vectors with entries +-1/4: all cosine products are exact, ties are common."""
  return rng.choice([-0.25, 0.25], size=(n, dim)).astype(np.float32)


# Retrieval.


def test_identity_embeddings_give_perfect_recall():
  emb = np.eye(6, dtype=np.float32)
  metrics = vlm_eval.retrieval_metrics(emb, 3.0 * emb, np.arange(6))
  assert metrics == {f'{d}_recall@{k}': 1.0 for d in ('i2t', 't2i') for k in (1, 5, 10)}


def test_similarity_is_cosine_not_dot_product():
  # By dot product the long vectors would win every query; by cosine none does.
  images = np.array([[1, 0], [0, 1], [10, 10]], np.float32)
  texts = np.array([[2, 0], [0, 0.5], [10, 10]], np.float32)
  metrics = vlm_eval.retrieval_metrics(images, texts, np.arange(3), ks=(1,))
  assert metrics == {'i2t_recall@1': 1.0, 't2i_recall@1': 1.0}
  zeroshot = vlm_eval.zeroshot_metrics(images[:2], np.arange(2), texts)
  assert zeroshot['zeroshot_top1'] == 1.0


def test_t2i_recall_at_known_ranks():
  # Texts 0..4 belong to images 0..4; their own image sits at rank 0, 1, 4, 5, 9.
  texts = _rows_with_ranks(range(5), [0, 1, 4, 5, 9], num_cands=10)
  metrics = vlm_eval.retrieval_metrics(np.eye(10), texts, np.arange(5))
  assert metrics['t2i_recall@1'] == pytest.approx(1 / 5)
  assert metrics['t2i_recall@5'] == pytest.approx(3 / 5)
  assert metrics['t2i_recall@10'] == pytest.approx(5 / 5)


def test_i2t_recall_at_known_ranks():
  # Image i owns caption i; image rows put it at the given rank among 10 texts.
  ranks = [0, 2, 5, 8, 0, 1, 3, 9, 4, 6]
  images = _rows_with_ranks(range(10), ranks, num_cands=10)
  metrics = vlm_eval.retrieval_metrics(images, np.eye(10), np.arange(10), ks=(1, 3, 6))
  assert metrics['i2t_recall@1'] == pytest.approx(2 / 10)
  assert metrics['i2t_recall@3'] == pytest.approx(4 / 10)
  assert metrics['i2t_recall@6'] == pytest.approx(7 / 10)


def test_i2t_hit_through_second_caption_only():
  # Three images with two captions each; texts are one-hot, image rows set the scores.
  text_to_image = np.array([0, 0, 1, 1, 2, 2])
  images = np.array([
      [0, 3, 5, 4, 1, 2],  # Own captions 0, 1: caption 1 is third, caption 0 last.
      [5, 1, 0, 4, 3, 2],  # Own captions 2, 3: caption 3 is second, caption 2 last.
      [1, 2, 3, 4, 6, 5],  # Own captions 4, 5: caption 4 is first.
  ], np.float32)
  metrics = vlm_eval.retrieval_metrics(images, np.eye(6), text_to_image, ks=(1, 2, 3))
  assert metrics['i2t_recall@1'] == pytest.approx(1 / 3)
  assert metrics['i2t_recall@2'] == pytest.approx(2 / 3)
  assert metrics['i2t_recall@3'] == pytest.approx(3 / 3)


def test_ties_are_broken_towards_the_lower_index():
  # Images 0 and 1 are identical, and so are their captions 0 and 1.
  images = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  texts = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  metrics = vlm_eval.retrieval_metrics(images, texts, np.arange(3), ks=(1, 2))
  # Image 1 ranks caption 0 before its own caption 1; caption 1 ranks image 0 first.
  assert metrics['i2t_recall@1'] == pytest.approx(2 / 3)
  assert metrics['t2i_recall@1'] == pytest.approx(2 / 3)
  assert metrics['i2t_recall@2'] == metrics['t2i_recall@2'] == 1.0


def test_images_without_captions_are_distractors_only():
  images = np.eye(3, dtype=np.float32)
  images[2] = images[0]  # Image 2 has no caption and copies image 0.
  texts = np.eye(3, dtype=np.float32)[:2]
  metrics = vlm_eval.retrieval_metrics(images, texts, np.array([0, 1]), ks=(1,))
  assert metrics == {'i2t_recall@1': 1.0, 't2i_recall@1': 1.0}
  # A duplicate with a lower index than the true image steals rank 0.
  metrics = vlm_eval.retrieval_metrics(images[::-1], texts, np.array([2, 1]), ks=(1,))
  assert metrics == {'i2t_recall@1': 1.0, 't2i_recall@1': 0.5}


@pytest.mark.parametrize('chunk_size', [1, 4, 7, 1000])
def test_chunked_matches_reference_with_many_ties(chunk_size):
  rng = np.random.default_rng(0)
  num_images, num_texts = 23, 41
  images = _dyadic_unit_vectors(rng, num_images)
  texts = _dyadic_unit_vectors(rng, num_texts)
  texts[::5] = images[:9]  # Exact matches as well as exact ties.
  text_to_image = rng.integers(0, num_images, num_texts)
  ks = (1, 2, 5, 10)
  metrics = vlm_eval.retrieval_metrics(images, texts, text_to_image, ks=ks,
                                       chunk_size=chunk_size)

  owns = text_to_image[None, :] == np.arange(num_images)[:, None]  # [N, M]
  i2t = _reference_ranks(images, texts, owns)[owns.any(axis=1)]
  t2i = _reference_ranks(texts, images, owns.T)
  expected = {f'i2t_recall@{k}': np.mean(i2t < k) for k in ks}
  expected.update({f't2i_recall@{k}': np.mean(t2i < k) for k in ks})
  assert metrics == pytest.approx(expected, abs=0)


def test_chunked_equals_unchunked_on_gaussian_embeddings():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(30, 8))
  texts = images[rng.integers(0, 30, 50)] + 0.7 * rng.normal(size=(50, 8))
  text_to_image = rng.integers(0, 30, 50)
  full = vlm_eval.retrieval_metrics(images, texts, text_to_image, chunk_size=10_000)
  for chunk_size in (1, 3, 16):
    assert vlm_eval.retrieval_metrics(images, texts, text_to_image,
                                      chunk_size=chunk_size) == full


def test_positive_ranks_matches_reference():
  rng = np.random.default_rng(2)
  queries = _dyadic_unit_vectors(rng, 9)
  cands = _dyadic_unit_vectors(rng, 12)
  query_keys = rng.integers(0, 4, 9)
  cand_keys = rng.integers(0, 5, 12)
  ranks = vlm_eval.positive_ranks(queries, cands, query_keys, cand_keys, chunk_size=4)
  expected = _reference_ranks(queries, cands, query_keys[:, None] == cand_keys[None])
  np.testing.assert_array_equal(ranks, expected)


def test_hard_negative_accuracy_counts_ties_as_failures():
  images = np.eye(4, dtype=np.float32)
  pos = np.array([[1, 0, 0, 0], [0, 2, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]], np.float32)
  neg = np.array([[0, 1, 0, 0], [0, 1, 2, 0], [0, 0, 1, 1], [0, 0, 0, 1]], np.float32)
  # Row 0 wins, row 1 wins (cosine), row 2 ties, row 3 loses.
  metrics = vlm_eval.hard_negative_accuracy(images, pos, neg)
  assert metrics == {'relation_accuracy': 0.5}


# Zero-shot.


def test_zeroshot_metrics_at_known_ranks():
  # Six classes, one image each; the true class sits at rank 0, 0, 1, 4, 5, 0.
  images = _rows_with_ranks(range(6), [0, 0, 1, 4, 5, 0], num_cands=6)
  images *= np.array([[1.0], [7.0], [0.1], [3.0], [1.0], [1e3]], np.float32)  # Scales.
  metrics = vlm_eval.zeroshot_metrics(images, np.arange(6), np.eye(6))
  assert metrics == pytest.approx({'zeroshot_top1': 3 / 6, 'zeroshot_top5': 5 / 6,
                                   'zeroshot_mean_per_class': 3 / 6})


def test_zeroshot_mean_per_class_is_balanced_and_top5_needs_five_classes():
  class_emb = np.eye(3, dtype=np.float32)
  images = np.array([[1, 0, 0]] * 4 + [[0, 0, 1]], np.float32)
  labels = np.array([0, 0, 0, 0, 1])  # Class 2 has no images; class 1 is missed.
  metrics = vlm_eval.zeroshot_metrics(images, labels, class_emb, chunk_size=2)
  assert metrics == pytest.approx({'zeroshot_top1': 0.8,
                                   'zeroshot_mean_per_class': 0.5})


def test_zeroshot_ties_go_to_the_lower_class():
  class_emb = np.array([[1, 0], [1, 0], [0, 1]], np.float32)  # Classes 0, 1 equal.
  images = np.array([[1, 0], [1, 0]], np.float32)
  metrics = vlm_eval.zeroshot_metrics(images, np.array([0, 1]), class_emb)
  assert metrics['zeroshot_top1'] == 0.5


class _FakeTextEncoder:
  """Bag-of-characters text encoder with a fixed random projection."""

  def __init__(self, dim=8, max_len=32):
    self.proj = np.random.default_rng(3).normal(size=(128, dim)).astype(np.float32)
    self.max_len = max_len
    self.batch_sizes = []

  def tokenize(self, prompts):
    tokens = np.zeros((len(prompts), self.max_len), np.int32)
    mask = np.zeros((len(prompts), self.max_len), bool)
    for i, prompt in enumerate(prompts):
      codes = [ord(ch) for ch in prompt[:self.max_len]]
      tokens[i, :len(codes)], mask[i, :len(codes)] = codes, True
    return tokens, mask

  def encode(self, tokens, mask):
    self.batch_sizes.append(len(tokens))
    return np.stack([self.proj[t[m]].sum(axis=0) for t, m in zip(tokens, mask)])

  def reference(self, prompt):
    tokens, mask = self.tokenize([prompt])
    return self.proj[tokens[0][mask[0]]].sum(axis=0).astype(np.float64)


def test_class_text_embeddings_matches_numpy_ensemble():
  encoder = _FakeTextEncoder()
  names = ['red circle', 'blue square', 'green cross']
  templates = ['a {}', 'a photo of a {}.', '{} on noise']
  emb = vlm_eval.class_text_embeddings(encoder.encode, encoder.tokenize, names,
                                       templates, batch_size=4)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  expected = np.stack([
      unit(np.mean([unit(encoder.reference(t.format(n))) for t in templates], axis=0))
      for n in names
  ])
  assert emb.shape == (3, 8) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
  assert encoder.batch_sizes == [4, 4, 4]  # 9 prompts, last batch padded.


@pytest.mark.parametrize('template', ['a photo', 'a {} and a {}', 'a {0}', 'a {name}',
                                      'a {'])
def test_class_text_embeddings_rejects_bad_templates(template):
  encoder = _FakeTextEncoder()
  with pytest.raises(ValueError, match='template'):
    vlm_eval.class_text_embeddings(encoder.encode, encoder.tokenize, ['circle'],
                                   ['a {}', template])
  assert not encoder.batch_sizes  # Checked before anything is encoded.


def test_class_text_embeddings_rejects_wrong_encoder_output():
  encoder = _FakeTextEncoder()
  with pytest.raises(ValueError, match=r'\[2, E\].*\(1, 8\)'):
    vlm_eval.class_text_embeddings(lambda t, m: encoder.encode(t, m)[:1],
                                   encoder.tokenize, ['a', 'b'], ['{}'])
  with pytest.raises(ValueError, match='one string'):
    vlm_eval.class_text_embeddings(encoder.encode, encoder.tokenize, 'circle', ['{}'])


def test_templates_from_captions_most_frequent_first():
  captions = ['the digit seven', 'a handwritten seven', 'the digit three', 'a handwritten 7',
              'a seven and a three', 'the digit SEVEN', 'sevens everywhere',
              'a scan of the number three', 'seven, seven', '  the digit three  ']
  # 'the digit {}' 4 times; the others once, in alphabetical order; numerals, two classes,
  # one class twice and 'sevens' (not a whole word) give nothing.
  assert vlm_eval.templates_from_captions(captions, ['three', 'seven'], 8) == [
      'the digit {}', 'a handwritten {}', 'a scan of the number {}']
  assert vlm_eval.templates_from_captions(captions, ['three', 'seven'], 2) == [
      'the digit {}', 'a handwritten {}']


def test_templates_from_captions_multi_word_names_and_braces():
  names = ['golden retriever', 'retriever', 'cat', 'c++']
  captions = ['a golden  retriever on grass', 'a Retriever', 'a golden retriever and a cat',
              'a cat {sleeping}', 'code in c++ today', 'a catalogue']
  templates = vlm_eval.templates_from_captions(captions, names, 8)
  assert templates == ['a {}', 'a {} on grass', 'a {} {{sleeping}}', 'code in {} today']
  assert templates[2].format('cat') == 'a cat {sleeping}'


def test_templates_from_captions_none_found():
  assert vlm_eval.templates_from_captions(['a handwritten 7', 'noise'], ['seven'], 8) == []
  assert vlm_eval.templates_from_captions(['a seven'], [], 8) == []
  assert vlm_eval.templates_from_captions([], ['seven'], 8) == []


# Invalid inputs.


@pytest.mark.parametrize('fn, args, message', [
    (vlm_eval.retrieval_metrics, (np.ones((3, 4)), np.ones((5, 6)), np.zeros(5, int)),
     r'image_emb \(3, 4\), text_emb \(5, 6\)'),
    (vlm_eval.retrieval_metrics, (np.ones((3, 4)), np.ones((5, 4)), np.zeros(4, int)),
     r'text_to_image must have shape \(5,\), got shape \(4,\)'),
    (vlm_eval.retrieval_metrics, (np.ones((3, 4)), np.ones((2, 4)), np.array([0, 3])),
     r'text_to_image values must lie in \[0, 3\)'),
    (vlm_eval.retrieval_metrics, (np.ones((3, 4)), np.ones((2, 4)), np.zeros(2)),
     'must hold integers'),
    (vlm_eval.retrieval_metrics, (np.ones(4), np.ones((2, 4)), np.zeros(2, int)),
     r'image_emb must be 2-D \[N, E\], got shape \(4,\)'),
    (vlm_eval.retrieval_metrics, (np.ones((0, 4)), np.ones((2, 4)), np.zeros(2, int)),
     'non-empty'),
    (vlm_eval.retrieval_metrics,
     (np.full((2, 4), np.nan), np.ones((2, 4)), np.zeros(2, int)), 'NaN'),
    (vlm_eval.zeroshot_metrics, (np.ones((3, 4)), np.zeros(3, int), np.ones((5, 6))),
     r'image_emb \(3, 4\), class_emb \(5, 6\)'),
    (vlm_eval.zeroshot_metrics, (np.ones((3, 4)), np.zeros(2, int), np.ones((5, 4))),
     r'labels must have shape \(3,\), got shape \(2,\)'),
    (vlm_eval.zeroshot_metrics, (np.ones((3, 4)), np.array([0, 1, 5]), np.ones((5, 4))),
     r'labels values must lie in \[0, 5\)'),
    (vlm_eval.hard_negative_accuracy, (np.ones((3, 4)), np.ones((3, 4)), np.ones((2, 4))),
     r'\(3, 4\), \(3, 4\) and \(2, 4\)'),
])
def test_invalid_inputs_raise_with_shapes(fn, args, message):
  with pytest.raises(ValueError, match=message):
    fn(*args)


@pytest.mark.parametrize('kwargs', [dict(ks=(0,)), dict(ks=()), dict(chunk_size=0)])
def test_invalid_ks_and_chunk_size(kwargs):
  with pytest.raises(ValueError, match='positive integer'):
    vlm_eval.retrieval_metrics(np.ones((2, 4)), np.ones((2, 4)), np.arange(2), **kwargs)
