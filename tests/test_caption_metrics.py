"""Tests for vlm_jax.eval.caption_metrics (against pycocoevalcap) and vqa_metrics."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlm_jax.eval import caption_metrics
from vlm_jax.eval import vqa_metrics


def coco_scores(predictions, references):
  """(BLEU-4, CIDEr-D) from pycocoevalcap, fed our tokens joined by spaces."""
  join = lambda text: ' '.join(caption_metrics.tokenize(text))
  res = {i: [join(p)] for i, p in enumerate(predictions)}
  gts = {i: [join(r) for r in refs] for i, refs in enumerate(references)}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  return bleu[3], float(cider)


def assert_matches_coco(predictions, references):
  bleu, cider = coco_scores(predictions, references)
  assert caption_metrics.bleu4(predictions, references) == pytest.approx(bleu, abs=1e-6)
  assert caption_metrics.cider_d(predictions, references) == pytest.approx(cider, abs=1e-6)
  return bleu, cider


def random_corpus(seed, size=60, vocab=8, max_words=12):
  rng = np.random.default_rng(seed)
  words = [f'w{i}' for i in range(vocab)]
  sentence = lambda lo: ' '.join(rng.choice(words, size=rng.integers(lo, max_words + 1)))
  predictions = [sentence(0) for _ in range(size)]
  references = [[sentence(1) for _ in range(rng.integers(1, 6))] for _ in range(size)]
  return predictions, references


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_corpora_match_pycocoevalcap(seed):
  predictions, references = random_corpus(seed)
  assert '' in predictions or seed  # empty hypotheses occur (seed 0)
  bleu, cider = assert_matches_coco(predictions, references)
  assert 0 < bleu < 1 and cider > 0


def test_small_vocabulary_and_long_sentences_match():
  # Few words: every n-gram occurs in many reference sets (idf near 0, repeated counts).
  assert_matches_coco(*random_corpus(3, size=25, vocab=3, max_words=20))


def test_exact_matches():
  predictions, references = random_corpus(4, size=20)
  predictions = [refs[0] for refs in references]
  bleu, cider = assert_matches_coco(predictions, references)
  assert bleu > 0.9


def test_no_overlap():
  _, references = random_corpus(5, size=20)
  predictions = ['zebra giraffe ' * k for k in range(1, 21)]
  bleu, cider = assert_matches_coco(predictions, references)
  assert bleu < 1e-3 and cider == 0


def test_short_hypotheses_get_the_brevity_penalty():
  _, references = random_corpus(6, size=30)
  predictions = [refs[0].split()[0] for refs in references]  # one word each
  bleu, _ = assert_matches_coco(predictions, references)
  assert bleu < 0.05
  predictions = [' '.join(refs[0].split()[:2]) for refs in references]
  assert_matches_coco(predictions, references)


def test_repeated_words_are_clipped():
  predictions = ['the the the the the the', 'a dog a dog a dog', 'red red circle']
  references = [['the cat is on the mat', 'there is a cat on the mat'],
                ['a dog runs', 'the dog is running', 'dog'],
                ['a red circle', 'red circle']]
  assert_matches_coco(predictions, references)


def test_closest_reference_length_ties_go_to_the_shorter():
  # The 4-word hypotheses are as close to the 3-word as to the 5-word references.
  predictions = ['a b c d', 'b c d e', 'a c e g']
  references = [['a b c', 'a b c d e'], ['b c d e f', 'b c d'], ['a b c d e', 'c d e']]
  assert_matches_coco(predictions, references)
  # Against the 3-word reference there is no brevity penalty (5 words would give 0.78).
  assert caption_metrics.bleu4(predictions[:1], references[:1]) == pytest.approx(1.0)


def test_normalisation_feeds_both_sides_the_same_tokens():
  assert caption_metrics.tokenize("A man's T-shirt.  Red,ball!") == [
      'a', 'man', 's', 't', 'shirt', 'red', 'ball']
  predictions = ['A Red Circle.', 'a blue square, left of a star!']
  references = [['a red circle', 'A red circle!'], ['A blue square to the left of a star.']]
  assert caption_metrics.bleu4(predictions, references) == caption_metrics.bleu4(
      [p.lower().replace('.', '').replace(',', '').replace('!', '') for p in predictions],
      [[r.lower().replace('.', '').replace('!', '') for r in refs] for refs in references])
  assert_matches_coco(predictions, references)


def test_bleu4_by_hand():
  # Precisions 4/5, 3/4, 2/3, 1/2, equal lengths: BLEU-4 = (1/5) ** (1/4).
  assert caption_metrics.bleu4(['a b c d e'], [['a b c d f']]) == pytest.approx(
      0.2**0.25, abs=1e-6)
  # Half the reference length: brevity penalty exp(1 - 2).
  assert caption_metrics.bleu4(['a b c d'], [['a b c d e f g h']]) == pytest.approx(
      np.exp(-1.0), abs=1e-6)


def test_cider_of_a_single_image_is_zero():
  # Every reference n-gram occurs in 1 of 1 reference sets: idf = log(1 / 1) = 0.
  assert caption_metrics.cider_d(['a red circle'], [['a red circle']]) == 0.0
  assert_matches_coco(['a red circle'], [['a red circle']])


def test_cider_d_scores_per_prediction():
  predictions, references = random_corpus(7, size=10)
  scores = caption_metrics.cider_d_scores(predictions, references)
  res = {i: [p] for i, p in enumerate(predictions)}
  gts = {i: list(refs) for i, refs in enumerate(references)}
  np.testing.assert_allclose(scores, Cider().compute_score(gts, res)[1], atol=1e-9)


@pytest.mark.parametrize('predictions,references,message', [
    (['a'], [['a'], ['b']], 'Got 1 predictions but 2 reference lists'),
    ([], [], 'at least one prediction'),
    (['a', 'b'], ['a', 'b'], r'references\[0\] must be a non-empty list of strings'),
    (['a'], [[]], r'references\[0\] must be a non-empty list'),
    ([3], [['a']], r'predictions\[0\] must be a string'),
    ('a b', [['a b']], 'not a single string'),
])
def test_caption_metrics_bad_input(predictions, references, message):
  for metric in (caption_metrics.bleu4, caption_metrics.cider_d):
    with pytest.raises(ValueError, match=message):
      metric(predictions, references)


# VQA.


@pytest.mark.parametrize('raw,normalised', [
    ('Yes', 'yes'),
    ('yes.', 'yes'),
    ('  Two  ', '2'),
    ('ten', '10'),
    ('none', '0'),
    ('the red one', 'red 1'),
    ('a dog', 'dog'),
    ('an apple', 'apple'),
    ('theater', 'theater'),  # articles are whole words only
    ('3.5', '3.5'),
    ('.5 inches', '.5 inches'),
    ('10,000', '10000'),
    ('red, white', 'red white'),
    ('black-and-white', 'black and white'),
    ('t - shirt', 't shirt'),
    ('yes!', 'yes'),
    ('(left)', 'left'),
    ('dont', "don't"),
    ("don't", "don't"),
    ('isnt', "isn't"),
    ('wouldve', "would've"),
    ('couldntve', "couldn't've"),
    ('its', 'its'),  # also a word: left alone
    ('well', 'well'),
    ('12:30', '12:30'),
    ("man's", "man's"),
    ('$5', '$5'),
    ('on the\tleft\nside', 'on left side'),
    ('A.M.', 'am'),
])
def test_normalize_answer(raw, normalised):
  assert vqa_metrics.normalize_answer(raw) == normalised


def test_vqa_accuracy_single_answers():
  predictions = ['Two', 'yes', 'a red circle', 'blue', "dont know"]
  answers = ['2', 'Yes.', 'red circle', 'green', "don't know"]
  assert vqa_metrics.vqa_accuracy(predictions, answers) == pytest.approx(0.8)
  assert vqa_metrics.vqa_accuracy(['x'], [['x']]) == 1.0


@pytest.mark.parametrize('matches,accuracy', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                               (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_consensus_of_ten_answers(matches, accuracy):
  answers = ['two'] * matches + ['three'] * (10 - matches)
  assert vqa_metrics.vqa_accuracy(['2'], [answers]) == pytest.approx(accuracy)


@pytest.mark.parametrize('predictions,answers,message', [
    (['a'], ['a', 'b'], 'Got 1 predictions but 2 answers'),
    ([], [], 'at least one prediction'),
    (['a'], [[]], r'answers\[0\] must be a string or a non-empty list'),
    ([None], ['a'], r'predictions\[0\] must be a string'),
    ('yes', ['yes'], 'not a single string'),
])
def test_vqa_accuracy_bad_input(predictions, answers, message):
  with pytest.raises(ValueError, match=message):
    vqa_metrics.vqa_accuracy(predictions, answers)
