"""The fusion objectives' pieces against hand-made cases and NumPy: MLM masking and loss,
ITM negative sampling and loss, swapped-caption negatives, ITM re-ranking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data import shapes_text
from vlm_jax.eval import matching as eval_matching
from vlm_jax.losses import matching
from vlm_jax.losses import mlm


def _ids_and_mask():
  # Rows: [BOS] t t t [EOS] [PAD]..., lengths 5, 3 and 8.
  lengths = np.array([5, 3, 8])
  mask = np.arange(8)[None, :] < lengths[:, None]
  ids = np.where(mask, 10 + np.arange(8)[None, :], 0).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(mask)


def test_maskable_positions_skip_bos_eos_and_padding():
  _, mask = _ids_and_mask()
  got = np.asarray(mlm.maskable_positions(mask))
  want = np.zeros((3, 8), bool)
  want[0, 1:4] = want[1, 1:2] = want[2, 1:7] = True
  np.testing.assert_array_equal(got, want)


def test_mask_tokens_80_10_10_and_only_maskable_positions():
  ids = jnp.full((4000, 32), 7, jnp.int32)
  mask = jnp.ones((4000, 32), bool)
  masked, targets = mlm.mask_tokens(jax.random.key(0), ids, mask, mask_id=4, vocab_size=1000,
                                    probability=0.15)
  masked, targets = np.asarray(masked), np.asarray(targets)
  assert not targets[:, 0].any() and not targets[:, -1].any()
  np.testing.assert_array_equal(masked[~targets], 7)  # unselected tokens untouched
  assert targets[:, 1:-1].mean() == pytest.approx(0.15, abs=0.005)
  chosen = masked[targets]
  assert (chosen == 4).mean() == pytest.approx(0.8, abs=0.01)
  # Random replacements are uniform over the vocabulary, so ~0.1% of them hit 7 again.
  assert ((chosen != 4) & (chosen != 7)).mean() == pytest.approx(0.1, abs=0.01)
  assert (chosen == 7).mean() == pytest.approx(0.1, abs=0.01)


def test_token_probabilities_raise_word_classes_over_the_base():
  table = mlm.token_probabilities(8, 0.15, [(0.9, [3, 5]), (0.5, [5, 6]), (0.0, [7])])
  np.testing.assert_allclose(table, [0.15, 0.15, 0.15, 0.9, 0.15, 0.9, 0.5, 0.15])
  with pytest.raises(ValueError, match=r'\[0, 8\)'):
    mlm.token_probabilities(8, 0.15, [(0.9, [8])])


def test_mask_tokens_select_each_token_with_its_own_probability():
  # Token 7 (a focused word) beside token 9 (any other word), in equal numbers.
  ids = jnp.asarray(np.tile([2, 7, 9, 7, 9, 3], (20000, 1)), jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  table = mlm.token_probabilities(12, 0.1, [(0.8, [7])])
  _, targets = mlm.mask_tokens(jax.random.key(1), ids, mask, mask_id=4, vocab_size=12,
                               probability=table)
  targets = np.asarray(targets)
  assert targets[:, [1, 3]].mean() == pytest.approx(0.8, abs=0.01)
  assert targets[:, [2, 4]].mean() == pytest.approx(0.1, abs=0.01)
  assert not targets[:, [0, 5]].any()  # BOS and EOS are never selected


def test_mask_tokens_with_a_flat_table_equal_the_scalar_probability():
  ids, mask = _ids_and_mask()
  want = mlm.mask_tokens(jax.random.key(3), ids, mask, mask_id=4, vocab_size=20,
                         probability=0.3)
  got = mlm.mask_tokens(jax.random.key(3), ids, mask, mask_id=4, vocab_size=20,
                        probability=jnp.full(20, 0.3))
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


def test_mlm_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  ids = rng.integers(0, 6, size=(2, 4))
  targets = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], bool)
  loss, metrics = mlm.mlm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(targets))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll[targets].mean(), rtol=1e-6)
  acc = (logits.argmax(-1) == ids)[targets].mean()
  np.testing.assert_allclose(metrics['mlm_accuracy'], acc)


def test_itm_loss_matches_numpy_and_ignores_zero_weights():
  logits = np.array([[0.0, 2.0], [1.0, -1.0], [3.0, 0.0], [5.0, -5.0]], np.float32)
  labels = np.array([1, 0, 1, 1])
  weights = np.array([1, 1, 1, 0], np.float32)
  loss, metrics = matching.itm_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(weights))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -logp[np.arange(4), labels]
  np.testing.assert_allclose(loss, nll[:3].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['itm_accuracy'], 2 / 3, rtol=1e-6)


def test_identical_rows_ignore_padding_values():
  ids = jnp.array([[2, 9, 3, 0], [2, 9, 3, 5], [2, 8, 3, 0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]], bool)
  got = np.asarray(matching.identical_rows(ids, mask))
  np.testing.assert_array_equal(got, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_hard_negatives_are_never_forbidden_and_follow_similarity():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  text = emb.copy()
  text[3] = emb[1]  # text 3 is image 1's near twin: image 1's hardest negative
  forbidden = np.eye(6, dtype=bool)
  forbidden[0, :] = True  # image 0 has no allowed negative at all
  counts = np.zeros(6)
  for seed in range(50):
    nt, nt_ok, ni, ni_ok = matching.sample_hard_negatives(
        jax.random.key(seed), jnp.asarray(emb), jnp.asarray(text), jnp.asarray(100.0),
        jnp.asarray(forbidden))
    nt, nt_ok, ni, ni_ok = map(np.asarray, (nt, nt_ok, ni, ni_ok))
    assert not nt_ok[0] and nt_ok[1:].all() and ni_ok.all()
    assert not forbidden[np.arange(1, 6), nt[1:]].any()
    assert not forbidden[ni, np.arange(6)].any()
    counts[nt[1]] += 1
  assert counts.argmax() == 3 and counts[3] >= 45


def test_attribute_negative_swaps_colours_and_keeps_the_relation():
  relation = 'a blue square to the left of a red circle'  # objects: red circle, blue square
  got = shapes_text.attribute_negative(['red', 'blue'], ['circle', 'square'], relation)
  assert got == 'a blue circle to the left of a red square'
  assert shapes_text.attribute_negative(['red', 'red'], ['circle', 'square'], relation) == ''
  with pytest.raises(ValueError, match='does not name the objects'):
    shapes_text.attribute_negative(['red', 'blue'], ['circle', 'star'], relation)


def test_swaps_of_any_caption_are_false_or_empty():
  colors, shapes = ['red', 'blue'], ['circle', 'star']
  assert shapes_text.swap_objects('a small red circle above a large blue star', colors,
                                  shapes) == 'a small blue star above a large red circle'
  assert shapes_text.swap_objects('a blue star to the left of a red circle', colors,
                                  shapes) == 'a red circle to the left of a blue star'
  # Without a stated relation, exchanging the objects could leave the caption true.
  assert shapes_text.swap_objects('a red circle and a blue star', colors, shapes) == ''
  assert shapes_text.swap_colors('a red circle and a blue star', colors,
                                 shapes) == 'a blue circle and a red star'
  assert shapes_text.swap_colors('a red circle and a blue circle', colors,
                                 ['circle', 'circle']) == ''
  assert shapes_text.swap_colors('a red circle above a blue circle', colors,
                                 ['circle', 'circle']) == 'a blue circle above a red circle'
  assert shapes_text.swap_colors('a red circle above a red star', ['red', 'red'], shapes) == ''


def test_swap_negatives_of_examples():
  examples = {
      'captions': [['a red circle'], ['a red circle above a blue star'],
                   ['a red circle above a red star']],
      'hard_negative': ['', 'a blue star above a red circle', 'a red star above a red circle'],
      'objects': [[{'color': 'red', 'shape': 'circle'}],
                  [{'color': 'red', 'shape': 'circle'}, {'color': 'blue', 'shape': 'star'}],
                  [{'color': 'red', 'shape': 'circle'}, {'color': 'red', 'shape': 'star'}]]}
  negs = eval_matching.swap_negatives(examples)
  assert sorted(negs) == ['attribute', 'position', 'relation']
  rows, trues, falses = negs['relation']
  np.testing.assert_array_equal(rows, [1, 2])
  assert falses == ['a blue star above a red circle', 'a red star above a red circle']
  rows, trues, falses = negs['attribute']
  np.testing.assert_array_equal(rows, [1])
  assert trues == ['a red circle above a blue star']
  assert falses == ['a blue circle above a red star']


def test_position_negatives_take_the_first_caption_that_names_a_place():
  objs = [{'color': 'red', 'shape': 'circle'}]
  examples = {
      'captions': [['a red circle', 'a red circle on the left', 'a red circle at the top'],
                   ['a red circle', 'a red circle in the middle'],
                   ['a red circle above a blue star']],
      'objects': [objs, objs, objs + [{'color': 'blue', 'shape': 'star'}]]}
  rows, trues, falses = eval_matching.position_negatives(examples)
  np.testing.assert_array_equal(rows, [0, 2])
  assert trues == ['a red circle on the left', 'a red circle above a blue star']
  assert falses == ['a red circle on the right', 'a red circle below a blue star']


def test_pair_and_itm_accuracy():
  assert eval_matching.pair_accuracy(np.array([1., 2., 3.]), np.array([0., 2., 4.])) == 1 / 3
  assert eval_matching.itm_accuracy(np.array([1., -1.]), np.array([-2., 0.5])) == 0.5


def test_rerank_ranks_by_hand():
  # Two queries, four candidates; first stage puts the positive at rank 2 / rank 3.
  sims = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.6]])
  positives = {0: [2], 1: [3]}
  # The re-scorer prefers candidate 2 strongly, the rest by index.
  score = lambda q, c: np.where(c == 2, 10.0, -c.astype(float))
  ranks = eval_matching.rerank_ranks(sims, positives.get, 3, score, chunk_pairs=2)
  np.testing.assert_array_equal(ranks, [0, 3])  # query 1's positive lies beyond the top 3
  recall = eval_matching.recall_at(ranks, (1, 4))
  assert recall == {1: 0.5, 4: 1.0}
