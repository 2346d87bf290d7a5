"""Captioning metrics: corpus BLEU-4 and CIDEr-D as the COCO caption evaluation reports them.

`bleu4` equals `pycocoevalcap.bleu.bleu.Bleu(4)`'s BLEU-4 and `cider_d` its
`pycocoevalcap.cider.cider.Cider()` score, on the same tokens (tests check both to 1e-6).
They are written here from the definitions; pycocoevalcap is only a test dependency.

Text normalisation (`tokenize`): lower case, every ASCII punctuation character replaced by a
space, split on whitespace ("A man's T-shirt." -> ['a', 'man', 's', 't', 'shirt']). The COCO
evaluation runs the Stanford PTB tokenizer (Java) instead; scores on already simple captions
agree, but are not comparable to published numbers to the last digit.
"""

from collections import Counter
from collections.abc import Sequence
import math
import string

import numpy as np

MAX_N = 4
CIDER_SIGMA = 6.0
_PUNCTUATION = str.maketrans(string.punctuation, ' ' * len(string.punctuation))

Ngrams = Counter[tuple[str, ...]]


def tokenize(text: str) -> list[str]:
  """Lower-cased words of `text`, punctuation removed (see the module docstring)."""
  return text.lower().translate(_PUNCTUATION).split()


def _ngrams(words: Sequence[str], max_n: int = MAX_N) -> Ngrams:
  """Counts of every n-gram (as a tuple of words) of order 1..max_n."""
  return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                 for i in range(len(words) - n + 1))


def _check(predictions: Sequence[str],
           references: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
  """Tokenised (predictions, references), or ValueError."""
  if isinstance(predictions, str) or isinstance(references, str):
    raise ValueError('predictions and references must be sequences, not a single string.')
  if len(predictions) != len(references):
    raise ValueError(f'Got {len(predictions)} predictions but {len(references)} reference '
                     'lists; there must be one list of references per prediction.')
  if not predictions:
    raise ValueError('Need at least one prediction.')
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    if not isinstance(pred, str):
      raise ValueError(f'predictions[{i}] must be a string, got {type(pred).__name__}.')
    if isinstance(refs, str) or not len(refs) or not all(isinstance(r, str) for r in refs):
      raise ValueError(f'references[{i}] must be a non-empty list of strings, got '
                       f'{refs!r}.')
  return ([tokenize(p) for p in predictions],
          [[tokenize(r) for r in refs] for refs in references])


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus BLEU-4 of `predictions` [N] against `references` [N][R_i] (R_i >= 1).

  Clipped n-gram matches (each n-gram counted at most as often as in any one reference)
  and candidate n-gram counts are summed over the corpus, then the geometric mean of the
  four precisions is multiplied by the brevity penalty exp(1 - r / c) when c < r, where c
  is the total prediction length and r the sum of each prediction's closest reference
  length (ties go to the shorter reference).

  pycocoevalcap quirks, reproduced: each precision is (matches + 1e-15) / (count + 1e-9),
  so a corpus with no 4-gram match scores about 1e-4 rather than 0, and one whose
  predictions are all shorter than 4 words keeps a factor (1e-6) ** (1/4); the brevity
  test is on (c + 1e-15) / (r + 1e-9) < 1, so c == r still costs a factor ~ 1 - 1e-9/r.
  """
  hyps, refss = _check(predictions, references)
  matches, counts = [0] * MAX_N, [0] * MAX_N
  hyp_len = ref_len = 0
  for hyp, refs in zip(hyps, refss):
    max_ref = Counter()
    for ref in refs:
      max_ref |= _ngrams(ref)  # union keeps the per-n-gram maximum
    for ngram, count in _ngrams(hyp).items():
      matches[len(ngram) - 1] += min(count, max_ref[ngram])
    for n in range(1, MAX_N + 1):
      counts[n - 1] += max(0, len(hyp) - n + 1)
    hyp_len += len(hyp)
    ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
  score = 1.0
  for m, c in zip(matches, counts):
    score *= (m + 1e-15) / (c + 1e-9)
  score **= 1.0 / MAX_N
  ratio = (hyp_len + 1e-15) / (ref_len + 1e-9)
  if ratio < 1:
    score *= math.exp(1 - 1 / ratio)
  return float(score)


def _tfidf(words: Sequence[str], doc_freq: Counter, log_num_docs: float):
  """(per-order {ngram: tf * idf} dicts [MAX_N], their L2 norms [MAX_N], length)."""
  vecs = [{} for _ in range(MAX_N)]
  for ngram, tf in _ngrams(words).items():
    vecs[len(ngram) - 1][ngram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[ngram])))
  norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
  # pycocoevalcap's length is the bigram count: the same differences between non-empty
  # sentences, and a pair with an empty sentence scores 0 at any length penalty.
  return vecs, norms, len(words)


def cider_d_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> np.ndarray:
  """Per-prediction CIDEr-D [N] (see `cider_d`)."""
  hyps, refss = _check(predictions, references)
  doc_freq = Counter()  # in how many images' reference sets each n-gram occurs
  for refs in refss:
    doc_freq.update(set().union(*(_ngrams(r) for r in refs)))
  log_num_docs = math.log(len(hyps))
  scores = []
  for hyp, refs in zip(hyps, refss):
    h_vecs, h_norms, h_len = _tfidf(hyp, doc_freq, log_num_docs)
    total = np.zeros(MAX_N)
    for ref in refs:
      r_vecs, r_norms, r_len = _tfidf(ref, doc_freq, log_num_docs)
      penalty = math.exp(-((h_len - r_len)**2) / (2 * CIDER_SIGMA**2))
      for n in range(MAX_N):
        # CIDEr-D clips the candidate's weight at the reference's.
        dot = sum(min(w, r_vecs[n].get(g, 0.0)) * r_vecs[n].get(g, 0.0)
                  for g, w in h_vecs[n].items())
        if h_norms[n] and r_norms[n]:
          dot /= h_norms[n] * r_norms[n]
        total[n] += dot * penalty
    scores.append(10.0 * total.mean() / len(refs))
  return np.asarray(scores)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus CIDEr-D of `predictions` [N] against `references` [N][R_i] (R_i >= 1).

  For n = 1..4, each sentence is a TF-IDF vector of its n-grams, with document
  frequencies counted over the reference sets of the evaluated corpus (an n-gram in no
  reference set gets idf log N). The score of a prediction is 10 x the mean over n of the
  average over its references of the cosine similarity, with the prediction's weights
  clipped at the reference's and a Gaussian length penalty exp(-delta^2 / (2 * 6^2)); the
  corpus score is the mean over predictions. With a single image every idf is 0 and so is
  the score.
  """
  return float(cider_d_scores(predictions, references).mean())
