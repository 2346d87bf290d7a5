"""Tiny Hugging Face reference checkpoints for the conversion tests, built offline: random
PyTorch models from small configs, every parameter perturbed (random init leaves LayerNorms
at 1 / 0 and would hide mapping mistakes), saved with their tokenizers."""
import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tokenizers import models, normalizers, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax.convert import hf_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

TEXTS = ['a small red circle', 'a blue square to the left of a red circle',
         "what's the colour of the star?", 'two large green crosses', 'a purple diamond'] * 4
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def perturb(model, seed: int = 0):
  """Adds N(0, 0.1^2) noise to every parameter, in place; returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=generator))
  return model.eval()


def _write_json(folder, name, value):
  with open(os.path.join(folder, name), 'w') as f:
    json.dump(value, f)


def clip_tokenizer(folder: str) -> tokenizers.Tokenizer:
  """A CLIP-style byte-level BPE, saved as vocab.json + merges.txt (no tokenizer.json)."""
  tok = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix='', end_of_word_suffix='</w>'))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(hf_tokenizer._CLIP_SPLIT), 'removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  trainer = trainers.BpeTrainer(vocab_size=320, end_of_word_suffix='</w>',
                                special_tokens=['<|startoftext|>', '<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  os.makedirs(folder, exist_ok=True)
  tok.model.save(folder)
  _write_json(folder, 'tokenizer_config.json', {
      'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>',
      'pad_token': '<|endoftext|>', 'unk_token': '<|endoftext|>'})
  return tok


def wordpiece_tokenizer(folder: str) -> tokenizers.Tokenizer:
  """A BERT WordPiece, saved as vocab.txt."""
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
      vocab_size=120, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])
  tok.train_from_iterator(TEXTS, trainer)
  os.makedirs(folder, exist_ok=True)
  tok.model.save(folder)
  _write_json(folder, 'tokenizer_config.json', {'do_lower_case': True})
  return tok


def sentencepiece_like_tokenizer(folder: str) -> tokenizers.Tokenizer:
  """A SigLIP-style tokenizer.json ('</s>' ends texts, no BOS)."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token='<unk>'))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=['<pad>', '</s>',
                                                                          '<unk>']))
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  _write_json(folder, 'tokenizer_config.json', {'eos_token': '</s>', 'pad_token': '</s>',
                                                'unk_token': '<unk>'})
  return tok


def build(family: str, folder: str):
  """Saves a perturbed tiny `family` model (+ tokenizer) in `folder`; returns the model."""
  import transformers  # pylint: disable=g-import-not-at-top
  if family == 'clip':
    tok = clip_tokenizer(folder)
    ids = {k: tok.token_to_id(t) for k, t in [('bos_token_id', '<|startoftext|>'),
                                             ('eos_token_id', '<|endoftext|>'),
                                             ('pad_token_id', '<|endoftext|>')]}
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=16,
                         hidden_act='quick_gelu', **ids, **TINY),
        # 64 px at patch 16: a 4 x 4 position grid, resized for 32 px images in evaluation.
        vision_config=dict(image_size=64, patch_size=16, hidden_act='gelu', **TINY),
        projection_dim=24)
    model = perturb(transformers.CLIPModel(config))
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      model.logit_scale.fill_(2.5)  # inside our CLIP clamp [0, ln 100]
  elif family == 'siglip':
    tok = sentencepiece_like_tokenizer(folder)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=8,
                         bos_token_id=None, eos_token_id=tok.token_to_id('</s>'),
                         pad_token_id=tok.token_to_id('</s>'), **TINY),
        vision_config=dict(image_size=32, patch_size=8, **TINY))
    model = perturb(transformers.SiglipModel(config))
  elif family == 'vit':
    config = transformers.ViTConfig(image_size=32, patch_size=8, **TINY)
    model = perturb(transformers.ViTModel(config))
  elif family == 'bert':
    tok = wordpiece_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(),
                                     max_position_embeddings=16, **TINY)
    model = perturb(transformers.BertForMaskedLM(config))
  else:
    raise ValueError(family)
  model.save_pretrained(folder)
  return model


def images(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def nchw(x: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def blip2(folder: str, cls: str = 'Blip2Model', text_input: bool = False):
  """Saves a perturbed tiny BLIP-2 `cls` (OPT language model where it has one) in `folder`;
  returns the model. Q-Former: D 32, 4 heads, 3 layers, cross-attention in layers 0 and 2,
  image tokens of width 24, 5 queries."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.Blip2Config(
      vision_config=dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2),
      qformer_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, cross_attention_frequency=2,
                          layer_norm_eps=1e-6, vocab_size=64,
                          use_qformer_text_input=text_input),
      text_config=dict(model_type='opt', vocab_size=64, hidden_size=16, ffn_dim=32,
                       num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16,
                       max_position_embeddings=32),
      num_query_tokens=5)
  model = perturb(getattr(transformers, cls)(config))
  model.save_pretrained(folder)
  return model
