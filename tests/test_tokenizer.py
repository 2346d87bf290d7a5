"""The word-level tokenizer: specials, round trips, truncation that keeps EOS, masks, errors."""
import numpy as np
import pytest
import tokenizers

from vlm_jax.data import datasets
from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tokenizer_lib

TEXTS = ['a small red circle', 'a blue square to the left of a red circle',
         'what color is the circle?', 'yes', 'no']


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_tokenizer(TEXTS)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id) == (
      0, 1, 2, 3, 4, 5)
  assert tok.vocab_size == 6 + len({w for t in TEXTS for w in t.replace('?', ' ?').split()})


def test_round_trip_lower_cases(tok):
  ids, mask = tok.encode_batch(['A Small RED circle', 'What color is the circle?'], 12)
  assert tok.decode_batch(ids) == ['a small red circle', 'what color is the circle ?']
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape == (2, 12)


def test_layout_and_mask(tok):
  ids, mask = tok.encode_batch(['a red circle', '', 'zebra'], 8)
  np.testing.assert_array_equal(ids[0, :5], [tok.bos_id] + list(ids[0, 1:4]) + [tok.eos_id])
  np.testing.assert_array_equal(mask.sum(1), [5, 2, 3])
  np.testing.assert_array_equal(ids[1, :2], [tok.bos_id, tok.eos_id])
  assert ids[2, 1] == tok.unk_id
  assert (ids[~mask] == tok.pad_id).all()
  assert (mask[:, :-1] >= mask[:, 1:]).all()  # real tokens first, then padding


@pytest.mark.parametrize('max_len', [2, 3, 5, 9])
def test_truncation_keeps_eos(tok, max_len):
  text = 'a blue square to the left of a red circle'
  ids, mask = tok.encode_batch([text], max_len)
  last = mask[0].sum() - 1
  assert ids[0, 0] == tok.bos_id and ids[0, last] == tok.eos_id
  assert (ids[0, 1:last] != tok.eos_id).all()
  assert tok.decode(ids[0]) == ' '.join(text.split()[:max_len - 2])


def test_save_and_load(tok, tmp_path):
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  loaded = tokenizer_lib.Tokenizer.from_file(path)
  for a, b in zip(loaded.encode_batch(TEXTS, 10), tok.encode_batch(TEXTS, 10)):
    np.testing.assert_array_equal(a, b)


def test_errors(tok, tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.json'):
    tokenizer_lib.Tokenizer.from_file(str(tmp_path / 'missing.json'))
  empty = tokenizers.Tokenizer(tokenizers.models.WordLevel({}, unk_token='[UNK]'))
  with pytest.raises(ValueError, match='empty'):
    tokenizer_lib.Tokenizer(empty)
  with pytest.raises(ValueError, match='at least 2'):
    tok.encode_batch(['a'], 1)
  with pytest.raises(TypeError, match='sequence of strings'):
    tok.encode_batch('a red circle', 8)


def test_foreign_special_token_names():
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {'<pad>': 0, '<s>': 1, '</s>': 2, '<unk>': 3, '<mask>': 4, '<cls>': 5, 'red': 6},
      unk_token='<unk>'))
  with pytest.raises(ValueError, match=r'lacks the special tokens .*\[PAD\]'):
    tokenizer_lib.Tokenizer(raw)
  tok = tokenizer_lib.Tokenizer(raw, special_tokens=dict(
      pad='<pad>', bos='<s>', eos='</s>', unk='<unk>', mask='<mask>', cls='<cls>'))
  ids, _ = tok.encode_batch(['red'], 4)
  np.testing.assert_array_equal(ids, [[1, 6, 2, 0]])


def test_dataset_tokenizer_covers_class_names(small_data_cfg):
  tok = datasets.load_tokenizer(small_data_cfg)
  ids, mask = tok.encode_batch([f'a large {name}' for name in shapes.CLASS_NAMES], 8)
  assert (ids[mask] != tok.unk_id).all()
  small_data_cfg.tokenizer = '/nonexistent/tokenizer.json'
  with pytest.raises(FileNotFoundError, match='/nonexistent/tokenizer.json'):
    datasets.load_tokenizer(small_data_cfg)


def test_memoised_rows_equal_fresh_encodings(monkeypatch):
  tok = tokenizer_lib.train_tokenizer(TEXTS)
  fresh = tokenizer_lib.train_tokenizer(TEXTS)
  texts = ['a red circle', 'A RED circle', 'a red circle', 'yes', 'zebra', 'a red circle']
  first_ids, first_mask = tok.encode_batch(texts, 6)
  first_ids[:] = -1  # the caller owns its arrays: this must not reach the memoised rows
  for max_len in (6, 3):  # another row length is another row
    ids, mask = tok.encode_batch(texts, max_len)
    for i, text in enumerate(texts):  # each text alone, by another tokenizer
      want_ids, want_mask = fresh.encode_batch([text], max_len)
      np.testing.assert_array_equal(ids[i], want_ids[0])
      np.testing.assert_array_equal(mask[i], want_mask[0])
  np.testing.assert_array_equal(first_mask, tok.encode_batch(texts, 6)[1])
  cased = tokenizer_lib.train_tokenizer(TEXTS)
  cased.backend.normalizer = None  # only `lowercase` lower-cases now
  assert cased.encode_batch(['A RED circle'], 6)[0][0, 1] != cased.unk_id
  cased.lowercase = False  # a setting that changes the rows is part of the key
  upper, _ = cased.encode_batch(['A RED circle'], 6)
  assert upper[0, 1] == upper[0, 2] == cased.unk_id
  monkeypatch.setattr(tokenizer_lib, 'ROW_CACHE_BYTES', 2000)  # a full memo is emptied
  texts = ['yes', 'no', 'a small red circle']  # 'yes' is in the memo, the others are not
  ids, _ = tok.encode_batch(texts, 6)
  np.testing.assert_array_equal(ids, fresh.encode_batch(texts, 6)[0])
  memo = tok._rows  # pylint: disable=protected-access
  assert sorted(text for text, _, _ in memo) == ['a small red circle', 'no']
  assert tok.encode_batch([], 4)[0].shape == (0, 4)
