"""A word-level tokenizer (Hugging Face `tokenizers`) with fixed-length batch encoding.

Encoded rows are `[BOS] tokens [EOS] [PAD]...`; a text too long for the row is cut so that
EOS is always its last real token, because EOT pooling reads the first EOS position.

Tokenizers of pretrained checkpoints (`vlm_jax.convert`) name their own special tokens, lack
some (SigLIP has no BOS, CLIP no [MASK]) and normalise texts themselves; a
`special_tokens.json` beside their `tokenizer.json` records that (see `Tokenizer.from_file`).
"""
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers

# Our special tokens, in id order: [PAD] is 0. EOS is deliberately not id 2: Hugging Face's
# CLIP text model switches to legacy argmax pooling when eos_token_id == 2.
SPECIAL_TOKENS = {'pad': '[PAD]', 'unk': '[UNK]', 'bos': '[BOS]', 'eos': '[EOS]',
                  'mask': '[MASK]', 'cls': '[CLS]'}
SPECIALS_FILE = 'special_tokens.json'  # beside tokenizer.json: {special_tokens, lowercase}
_ROW_OVERHEAD_BYTES = 400  # the Python objects of one memoised row, beyond text and ids
ROW_CACHE_BYTES = 32 << 20  # about what `encode_batch`'s memo of rows may hold; emptied when full


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` and the ids of its special tokens."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, lowercase: bool = True,
               special_tokens: Mapping[str, str] | None = None, source: str = '<memory>'):
    """Args:
      tokenizer: the underlying tokenizer.
      lowercase: lower-case texts before encoding.
      special_tokens: names of the special tokens, keyed like SPECIAL_TOKENS (pad, unk,
        bos, eos, mask, cls); those given override SPECIAL_TOKENS' names, e.g.
        {'bos': '<|startoftext|>', 'eos': '<|endoftext|>'}. None marks a token the
        tokenizer does not have (its id is then None; rows start without BOS when BOS is
        None); pad and eos are required.
      source: where the tokenizer came from, for error messages.
    """
    self._tok = tokenizer
    self.lowercase = lowercase
    names = {**SPECIAL_TOKENS, **(special_tokens or {})}
    unknown_keys = set(names) - set(SPECIAL_TOKENS)
    if unknown_keys:
      raise ValueError(f'Unknown special token keys {sorted(unknown_keys)}; accepted: '
                       f'{sorted(SPECIAL_TOKENS)}.')
    if names['pad'] is None or names['eos'] is None:
      raise ValueError(f'Tokenizer from {source}: the pad and eos special tokens are required.')
    self._names = names
    present = {name for name in names.values() if name is not None}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size <= len(present):
      raise ValueError(f'Tokenizer from {source} has {vocab_size} tokens: nothing beyond its '
                       f'{len(present)} special tokens (is it empty?).')
    missing = sorted(name for name in present if tokenizer.token_to_id(name) is None)
    if missing:
      raise ValueError(f'Tokenizer from {source} lacks the special tokens {missing}; pass '
                       'special_tokens={...} naming its own (keys: '
                       f'{sorted(SPECIAL_TOKENS)}).')
    self._ids = {key: None if name is None else tokenizer.token_to_id(name)
                 for key, name in names.items()}
    self._special_ids = frozenset(i for i in self._ids.values() if i is not None)
    self._rows: dict[tuple[str, int, bool], tuple[np.ndarray, int]] = {}
    self._rows_bytes = 0  # an estimate of the memo's size

  @classmethod
  def from_file(cls, path: str, **kwargs) -> 'Tokenizer':
    """Loads a `tokenizer.json`; kwargs go to the constructor.

    A `special_tokens.json` in the same directory, `{"special_tokens": {...}, "lowercase":
    false}`, supplies the constructor's arguments (those in kwargs take precedence).
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(f'No tokenizer file at {path!r}: expected a tokenizer.json '
                              '(set --config.data.tokenizer, or leave it empty to use the '
                              "dataset's own).")
    specials = os.path.join(os.path.dirname(path), SPECIALS_FILE)
    if os.path.isfile(specials):
      with open(specials) as f:
        kwargs = {**json.load(f), **kwargs}
    return cls(tokenizers.Tokenizer.from_file(path), source=path, **kwargs)

  def save(self, path: str) -> None:
    """Writes `path` (tokenizer.json) and, unless the specials and lowercasing are the
    defaults, `special_tokens.json` beside it."""
    self._tok.save(path)
    if self._names != SPECIAL_TOKENS or not self.lowercase:
      with open(os.path.join(os.path.dirname(path), SPECIALS_FILE), 'w') as f:
        json.dump({'special_tokens': self._names, 'lowercase': self.lowercase}, f, indent=2)

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer`."""
    return self._tok

  @property
  def special_tokens(self) -> dict[str, str | None]:
    """Names of the special tokens by key (pad, unk, bos, eos, mask, cls); None if absent."""
    return dict(self._names)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._ids['pad']

  @property
  def unk_id(self) -> int:
    return self._ids['unk']

  @property
  def bos_id(self) -> int:
    return self._ids['bos']

  @property
  def eos_id(self) -> int:
    return self._ids['eos']

  @property
  def mask_id(self) -> int:
    return self._ids['mask']

  @property
  def cls_id(self) -> int:
    return self._ids['cls']

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes B texts to rows of length L = max_len.

    Returns:
      ids: int32 [B, L], `[BOS] tokens [EOS] [PAD]...`; a text with more than L - 2 tokens
        keeps its first L - 2, so EOS is always present. Without a BOS token, rows start
        with the text's tokens (and keep L - 1 of them).
      mask: bool [B, L], True on BOS, tokens and EOS.

    Rows are memoised by (text, L): train captions repeat (the 250,000 of `shapes` hold
    33,142 distinct texts), and a cached row costs a dictionary lookup instead of the
    tokenizer's ~7 us.
    """
    if isinstance(texts, str):
      raise TypeError(f'encode_batch takes a sequence of strings, not one string: {texts!r}.')
    if max_len < 2:
      raise ValueError(f'max_len must be at least 2 (room for BOS and EOS), got {max_len}.')
    keys = [(text, max_len, self.lowercase) for text in texts]
    rows = [self._rows.get(key) for key in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
      added = sum(_ROW_OVERHEAD_BYTES + len(texts[i]) + 4 * max_len for i in missing)
      if self._rows_bytes + added > ROW_CACHE_BYTES:
        self._rows.clear()
        self._rows_bytes = 0
      self._rows_bytes += added
      bos = [] if self.bos_id is None else [self.bos_id]
      for i, encoding in zip(missing, self._encode([texts[i] for i in missing])):
        tokens = bos + encoding.ids[:max_len - 1 - len(bos)] + [self.eos_id]
        ids = np.full(max_len, self.pad_id, np.int32)
        ids[:len(tokens)] = tokens
        ids.flags.writeable = False
        rows[i] = self._rows[keys[i]] = (ids, len(tokens))
    if not rows:
      return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.bool_)
    lengths = np.asarray([length for _, length in rows])
    return np.stack([ids for ids, _ in rows]), np.arange(max_len) < lengths[:, None]

  def _encode(self, texts: Sequence[str]) -> list[tokenizers.Encoding]:
    texts = [t.lower() for t in texts] if self.lowercase else list(texts)
    return self._tok.encode_batch(texts, add_special_tokens=False)

  def word_ids(self, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """The ids of the words that encode to one known token, and the words that do not
    (split into pieces, or unknown): ([ids], [left-out words])."""
    ids, left_out = [], []
    for word, encoding in zip(words, self._encode(list(words))):
      if len(encoding.ids) == 1 and encoding.ids[0] != self.unk_id:
        ids.append(encoding.ids[0])
      else:
        left_out.append(word)
    return ids, left_out

  def row_lengths(self, texts: Sequence[str]) -> np.ndarray:
    """int [B]: the row length each text needs untruncated, BOS (if any) and EOS included;
    `encode_batch(texts, L)` cuts the texts whose length exceeds L."""
    extra = 1 if self.bos_id is None else 2
    return np.asarray([len(e.ids) + extra for e in self._encode(texts)], np.int64)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of one row of ids: stops at the first EOS, drops special tokens."""
    kept = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i not in self._special_ids:
        kept.append(i)
    return self._tok.decode(kept, skip_special_tokens=True)

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """`decode` of every row of ids [B, L]."""
    return [self.decode(row) for row in np.asarray(ids)]


def train_tokenizer(texts: Iterable[str], path: str | None = None) -> Tokenizer:
  """Trains a lower-casing word-level tokenizer on `texts`; saves it to `path` if given.

  Words are split at whitespace and punctuation ("circle?" -> "circle", "?"). Ids 0-5 are
  [PAD], [UNK], [BOS], [EOS], [MASK], [CLS]; words follow by frequency.
  """
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS['unk']))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()))
  tok.train_from_iterator(texts, trainer=trainer)
  result = Tokenizer(tok, source='train_tokenizer')
  if path is not None:
    result.save(path)
  return result
