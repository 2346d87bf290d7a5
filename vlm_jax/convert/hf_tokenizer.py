"""Tokenizers of Hugging Face checkpoint folders, through the `tokenizers` library.

Read: `tokenizer.json` when there is one; otherwise CLIP's byte-level BPE from `vocab.json`
and `merges.txt`, or BERT's WordPiece from `vocab.txt`. Special tokens come from
`tokenizer_config.json` / `special_tokens_map.json`, else from the family's usual names.
Written: `tokenizer.json` with a post-processor adding BOS/EOS as `encode_batch` does, and a
`tokenizer_config.json` naming the special tokens.
"""
import json
import os

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vlm_jax.convert import hf_io
from vlm_jax.data.tokenizer import Tokenizer

# Our special-token keys -> the family's token names when the folder does not say.
FAMILY_SPECIALS = {
    'clip': dict(bos='<|startoftext|>', eos='<|endoftext|>', pad='<|endoftext|>',
                 unk='<|endoftext|>', mask=None, cls=None),
    'siglip': dict(bos=None, eos='</s>', pad='</s>', unk='<unk>', mask=None, cls=None),
    'bert': dict(bos='[CLS]', eos='[SEP]', pad='[PAD]', unk='[UNK]', mask='[MASK]',
                 cls='[CLS]'),
}
# Our key -> Hugging Face tokenizer_config keys, first present wins.
_HF_KEYS = {'bos': ('bos_token', 'cls_token'), 'eos': ('eos_token', 'sep_token'),
            'pad': ('pad_token',), 'unk': ('unk_token',), 'mask': ('mask_token',),
            'cls': ('cls_token',)}
# CLIP's pre-tokenisation: contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_name(value) -> str | None:
  if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
    return value.get('content')
  return value


def _folder_specials(folder: str) -> dict:
  """Special tokens declared by tokenizer_config.json and special_tokens_map.json."""
  declared = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      declared.update({k: _token_name(v) for k, v in hf_io.read_json(path).items()
                       if k.endswith('_token') and _token_name(v)})
  return declared


def _clip_bpe(folder: str, unk: str) -> tokenizers.Tokenizer:
  bpe = models.BPE.from_file(os.path.join(folder, 'vocab.json'),
                             os.path.join(folder, 'merges.txt'), unk_token=unk,
                             continuing_subword_prefix='', end_of_word_suffix='</w>',
                             fuse_unk=False)
  tok = tokenizers.Tokenizer(bpe)
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_CLIP_SPLIT), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def _bert_wordpiece(folder: str, unk: str, lowercase: bool) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.WordPiece.from_file(os.path.join(folder, 'vocab.txt'),
                                                        unk_token=unk))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix='##')
  return tok


def _backend(folder: str, specials: dict, config: dict) -> tokenizers.Tokenizer:
  if os.path.isfile(os.path.join(folder, 'tokenizer.json')):
    return tokenizers.Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
  has = lambda *names: all(os.path.isfile(os.path.join(folder, n)) for n in names)
  if has('vocab.json', 'merges.txt'):
    tok = _clip_bpe(folder, specials['unk'])
  elif has('vocab.txt'):
    tok = _bert_wordpiece(folder, specials['unk'], config.get('do_lower_case', True))
  else:
    raise FileNotFoundError(
        f'No tokenizer in {folder!r}: expected tokenizer.json, vocab.json + merges.txt (BPE) '
        'or vocab.txt (WordPiece). A sentencepiece-only tokenizer (spiece.model) must first be '
        'saved as tokenizer.json with transformers (AutoTokenizer...save_pretrained).')
  tok.add_special_tokens(sorted({n for n in specials.values() if n}))
  return tok


def has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, n))
             for n in ('tokenizer.json', 'vocab.json', 'vocab.txt'))


def load(folder: str, family: str) -> Tokenizer:
  """The tokenizer of a checkpoint folder, wrapped with the checkpoint's special tokens.

  Raises ValueError for an empty vocabulary or special tokens it does not contain.
  """
  declared = _folder_specials(folder)
  specials = dict(FAMILY_SPECIALS.get(family, FAMILY_SPECIALS['bert']))
  for key, hf_keys in _HF_KEYS.items():
    found = next((declared[k] for k in hf_keys if declared.get(k)), None)
    if found:
      specials[key] = found
  if family == 'siglip' and 'bos_token' not in declared:
    specials['bos'] = None
  if not declared.get('pad_token'):
    specials['pad'] = specials['pad'] or specials['eos']
  path = os.path.join(folder, 'tokenizer_config.json')
  config = hf_io.read_json(path) if os.path.isfile(path) else {}
  backend = _backend(folder, specials, config)
  if backend.get_vocab_size(with_added_tokens=True) == 0:
    raise ValueError(f'The tokenizer in {folder!r} has an empty vocabulary.')
  # Absent optional specials (e.g. BERT-style keys a CLIP vocabulary lacks) become None.
  for key in ('unk', 'mask', 'cls', 'bos'):
    if specials[key] is not None and backend.token_to_id(specials[key]) is None:
      specials[key] = None
  return Tokenizer(backend, lowercase=False, special_tokens=specials, source=folder)


def save_hf(tokenizer: Tokenizer, folder: str, model_max_length: int) -> None:
  """Writes tokenizer.json (adding BOS/EOS like `encode_batch`) and tokenizer_config.json."""
  backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
  names = tokenizer.special_tokens
  bos = f'{names["bos"]} ' if tokenizer.bos_id is not None else ''
  pairs = [(n, backend.token_to_id(n)) for n in {names['bos'], names['eos']} if n]
  backend.post_processor = processors.TemplateProcessing(
      single=f'{bos}$A {names["eos"]}', pair=f'{bos}$A {names["eos"]} $B:1 {names["eos"]}:1',
      special_tokens=pairs)
  if tokenizer.lowercase:  # our wrapper lower-cases before encoding; make that the model's
    backend.normalizer = normalizers.Sequence(
        [n for n in [backend.normalizer] if n is not None] + [normalizers.Lowercase()])
  backend.save(os.path.join(folder, 'tokenizer.json'))
  hf_names = {'bos': 'bos_token', 'eos': 'eos_token', 'pad': 'pad_token', 'unk': 'unk_token',
              'mask': 'mask_token', 'cls': 'cls_token'}
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': model_max_length,
            **{hf_names[k]: v for k, v in names.items() if v is not None}}
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
