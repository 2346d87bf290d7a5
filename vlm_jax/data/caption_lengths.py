"""Counting the train captions that `data.max_text_len` cuts, so that truncation is never
silent.

`Tokenizer.encode_batch` cuts a text longer than its row and keeps EOS (EOT pooling reads
it); a run whose captions are mostly cut trains on their beginnings only. The train stream
calls `warn_truncated` once, when it is made: one warning line with the count.
"""
import logging
from typing import Sequence

import numpy as np

from vlm_jax.data import records
from vlm_jax.data import tokenizer as tokenizer_lib

MAX_EXAMPLES = 2048  # examples read at most, evenly spaced over the split (< 1 s)


def count_truncated(tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str],
                    max_len: int) -> int:
  """How many of `texts` need more than `max_len` tokens (BOS and EOS included)."""
  if not texts:
    return 0
  return int(np.sum(tokenizer.row_lengths(texts) > max_len))


def sample_captions(source: Sequence[bytes], max_examples: int = MAX_EXAMPLES
                    ) -> tuple[list[str], int]:
  """(all captions of up to `max_examples` evenly spaced examples of a raw source, the
  number of examples read)."""
  n = len(source)
  ids = np.unique(np.linspace(0, n - 1, min(n, max_examples)).round().astype(int)).tolist()
  if hasattr(source, '__getitems__'):
    serialized = source.__getitems__(ids)  # one batched read
  else:
    serialized = [source[i] for i in ids]
  return [c for r in serialized for c in records.texts(records.parse(r), 'captions')], len(ids)


def warn_truncated(source: Sequence[bytes], tokenizer: tokenizer_lib.Tokenizer,
                   max_len: int, max_examples: int = MAX_EXAMPLES) -> tuple[int, int]:
  """Logs one warning if captions of the raw train `source` exceed `max_len` tokens; returns
  (captions that do, captions counted)."""
  captions, read = sample_captions(source, max_examples)
  over = count_truncated(tokenizer, captions, max_len)
  if over:
    sample = '' if read == len(source) else (
        f' (counted on {read} evenly spaced of the {len(source)} train examples)')
    logging.warning('%d of %d train captions (%.1f%%) exceed data.max_text_len=%d tokens and '
                    'are truncated, keeping their EOS%s; raise data.max_text_len to keep them '
                    'whole.', over, len(captions), 100.0 * over / len(captions), max_len,
                    sample)
  return over, len(captions)
