"""VQA accuracy with the answer normalisation of the official VQA evaluation.

`normalize_answer` applies, in order, the rules the VQA evaluation documents:
  1. newlines and tabs become spaces; lower case.
  2. punctuation: a comma between two digits is dropped ("10,000" -> "10000"); each other
     mark of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  becomes a space (words are
     re-split below, so a mark next to a space simply disappears). Apostrophes and colons
     are kept, as are marks outside this list (e.g. $ % # &), as in the official code.
  3. a period is dropped unless a digit follows it ("3.5" and ".5" stay, "yes." -> "yes").
  4. number words zero..ten become digits; "none" also becomes "0", as in the official
     evaluation (so "none" answers "how many" questions).
  5. the articles a, an, the are removed.
  6. a contraction written without its apostrophe gets it back ("dont" -> "don't",
     "wouldve" -> "would've"); forms that are also English words (its, well, were, ill,
     hell, shell, shed, wed, id, lets, whore) are left alone.
Two departures from the official script, both rarely visible: it decides between deleting a
mark and spacing it once per answer (here per occurrence), and it normalises nothing for a
question whose annotators all gave the same raw answer (here both sides are always
normalised, so "two" matches "2").
"""

from collections.abc import Sequence
import re

import numpy as np

_MARKS = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r'(?<=\d),(?=\d)')
_MARK_RE = re.compile('[' + re.escape(_MARKS) + ']')
_PERIOD = re.compile(r'\.(?!\d)')
_NUMBERS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten'.split())}
_NUMBERS['none'] = '0'
_ARTICLES = frozenset(('a', 'an', 'the'))


def _contractions() -> dict[str, str]:
  """{'dont': "don't", ...}: contractions spelled without their apostrophe."""
  suffixes = {
      "n't": 'ai are ca could did does do had has have is might must need ought sha should '
             'was were wo would',
      "'ve": 'i you we they who what where could might must should would',
      "'ll": 'you it they that there what who how when why',
      "'re": 'you they what why there',
      "'s": 'he she that there what where who how when why',
      "'d": 'you he it they who what where how there why',
  }
  table = {}
  for suffix, words in suffixes.items():
    for word in words.split():
      table[word + suffix.replace("'", '')] = word + suffix
  for word in 'could might must should would'.split():
    table[word + 'ntve'] = word + "n't've"
  table.update({'im': "i'm", 'oclock': "o'clock", 'maam': "ma'am", 'yall': "y'all"})
  return table


_CONTRACTIONS = _contractions()


def normalize_answer(answer: str) -> str:
  """`answer` normalised by the VQA evaluation's rules (see the module docstring)."""
  text = answer.replace('\n', ' ').replace('\t', ' ').lower()
  text = _MARK_RE.sub(' ', _DIGIT_COMMA.sub('', text))
  text = _PERIOD.sub('', text)
  words = (_NUMBERS.get(w, w) for w in text.split())
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Exact match for one answer; for several, the VQA consensus: the mean over the
  leave-one-out subsets of min(1, matching answers / 3)."""
  if len(answers) == 1:
    return float(prediction == answers[0])
  matches = sum(prediction == a for a in answers)
  # Leaving out a matching answer removes one match, leaving out another removes none.
  return float(np.mean([min(1.0, (matches - (prediction == a)) / 3) for a in answers]))


def vqa_accuracy(predictions: Sequence[str],
                 answers: Sequence[str | Sequence[str]]) -> float:
  """Mean accuracy of `predictions` [N] against `answers` [N], after `normalize_answer`.

  `answers[i]` is one ground-truth string (normalised exact match) or a list of annotator
  answers (e.g. VQAv2's 10), scored with the official consensus formula.
  """
  if isinstance(predictions, str) or isinstance(answers, str):
    raise ValueError('predictions and answers must be sequences, not a single string.')
  if len(predictions) != len(answers):
    raise ValueError(f'Got {len(predictions)} predictions but {len(answers)} answers.')
  if not predictions:
    raise ValueError('Need at least one prediction.')
  scores = []
  for i, (pred, gts) in enumerate(zip(predictions, answers)):
    gts = [gts] if isinstance(gts, str) else list(gts)
    if not isinstance(pred, str):
      raise ValueError(f'predictions[{i}] must be a string, got {type(pred).__name__}.')
    if not gts or not all(isinstance(a, str) for a in gts):
      raise ValueError(f'answers[{i}] must be a string or a non-empty list of strings, '
                       f'got {gts!r}.')
    scores.append(_question_accuracy(normalize_answer(pred),
                                     [normalize_answer(a) for a in gts]))
  return float(np.mean(scores))
