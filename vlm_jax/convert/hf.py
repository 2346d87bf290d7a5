"""Import and export of Hugging Face checkpoint folders, by family (`config.json`'s
`model_type`): config <-> our config, tensors <-> our parameters, tokenizer, preprocessing.

A family is a module with NAME, ARCHITECTURE, IGNORE and DROPPED (regexes of tensors that
are not parameters / that are dropped with a log line), `config_from_hf(hf, folder, names)`,
`config_to_hf(config, tokenizer)`, `rules(config)` and `write_extras(folder, config)`; see
`clip.py`. Optionally EXTRA_WEIGHTS, {file: tensor names}: tensors that the transformers
class does not hold, read from and written to their own safetensors files beside
model.safetensors (blip2_qformer.py). `register_family` adds a family.
"""
import logging
import os
import re
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax.convert import bert, clip, hf_io, hf_tokenizer, siglip, vit
from vlm_jax.convert.hf_config import UnsupportedFamilyError
from vlm_jax.convert import rules as R
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.nn.transformer import stack_layer_params, unstack_layer_params

FAMILIES: dict[str, ModuleType] = {'clip': clip, 'siglip': siglip, 'vit': vit, 'bert': bert}
# Our model name -> the families it exports to (the first is the default).
EXPORTS = {'dual_encoder': ('clip', 'siglip'), 'image_encoder': ('vit',),
           'masked_lm': ('bert',)}
# Keys that do not change parameters or outputs: ignored when checking that an export is exact.
_NOT_ARCHITECTURE = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'image.dropout',
                     'text.dropout', 'temperature.init', 'temperature.bias_init',
                     'temperature.min', 'temperature.max', 'fusion', 'heads')
# The architecture of a 'qformer' model (fusion keys, named, override the line above).
_QFORMER_KEYS = ('image.width', 'fusion.width', 'fusion.depth', 'fusion.num_heads',
                 'fusion.mlp_dim', 'fusion.ln_eps', 'fusion.every', 'fusion.num_queries')
_WITHOUT_TEXT = ('image_encoder', 'qformer')  # models that take no tokenizer


def register_family(model_type: str, family: ModuleType, exports_model: str = '') -> None:
  """Adds a family for Hugging Face `model_type` (and as an export target of our model
  `exports_model`, if given)."""
  FAMILIES[model_type] = family
  if exports_model:
    EXPORTS[exports_model] = (*EXPORTS.get(exports_model, ()), model_type)


def family_of(hf_config: dict, source: str) -> ModuleType:
  model_type = hf_config.get('model_type')
  if model_type not in FAMILIES:
    raise UnsupportedFamilyError(
        f'{source}: model_type {model_type!r} is not supported; supported: '
        f'{", ".join(sorted(FAMILIES))}.')
  return FAMILIES[model_type]


def dummy_inputs(config: ml_collections.ConfigDict) -> tuple:
  """Inputs of batch 1 for `model.init`, by `config.model.name`."""
  size, length = config.data.image_size, config.data.max_text_len
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  ids, mask = jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool)
  by_model = {'dual_encoder': (images, ids, mask), 'image_encoder': (images,),
              'masked_lm': (ids, mask),
              'qformer': (jnp.zeros((1, 1, config.model.image.width), jnp.float32),)}
  if config.model.name not in by_model:
    raise ValueError(f'model.name {config.model.name!r} has no Hugging Face conversion; '
                     f'accepted: {", ".join(by_model)}.')
  return by_model[config.model.name]


def build(config: ml_collections.ConfigDict) -> nn.Module:
  return models.build_model(config.model, text_max_len=config.data.max_text_len)


def param_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """'/'-joined parameter path -> shape of the model of `config`, without allocating."""
  model = build(config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                      *dummy_inputs(config))['params']))
  return {k: v.shape for k, v in R.flatten(shapes).items()}


def relayout(params: Any, scan: bool) -> Any:
  """Encoder subtrees as per-layer 'block_{i}' (scan False) or a stacked 'blocks' (True)."""
  if not isinstance(params, dict):
    return params
  if scan and 'block_0' in params:
    rest = {k: v for k, v in params.items() if not re.fullmatch(r'block_\d+', k)}
    depth = len(params) - len(rest)
    return {**rest, **stack_layer_params(params, depth)}
  if not scan and 'blocks' in params:
    rest = {k: v for k, v in params.items() if k != 'blocks'}
    return {**rest, **unstack_layer_params({'blocks': params['blocks']})}
  return {k: relayout(v, scan) for k, v in params.items()}


def import_hf(folder: str) -> tuple[ml_collections.ConfigDict, dict, Tokenizer | None]:
  """A Hugging Face folder -> (our full config, numpy parameters, tokenizer or None).

  Raises:
    ConversionError (UnsupportedOptionError, UnsupportedFamilyError): naming the option.
    FileNotFoundError: no config.json or safetensors weights.
  """
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config.json in {folder!r}: expected a Hugging Face '
                            'checkpoint folder (save_pretrained).')
  hf_config = hf_io.read_json(path)
  family = family_of(hf_config, path)
  tensors = hf_io.read_weights(folder)
  for name in getattr(family, 'EXTRA_WEIGHTS', {}):
    if os.path.isfile(os.path.join(folder, name)):
      tensors.update(hf_io.read_safetensors(os.path.join(folder, name)))
  config = family.config_from_hf(hf_config, folder, set(tensors))
  dropped = sorted(n for n in tensors if any(re.fullmatch(p, n) for p in family.DROPPED))
  if dropped:
    logging.warning('Dropping %d tensors the converted model has no use for: %s',
                    len(dropped), ', '.join(dropped[:6]))
  params = R.to_params(family.rules(config), tensors, param_shapes(config),
                       ignore=family.IGNORE + family.DROPPED, what=folder)
  tokenizer = None
  text = config.model.name not in _WITHOUT_TEXT
  if text and not hf_tokenizer.has_tokenizer(folder):
    logging.warning('No tokenizer.json, vocab.json + merges.txt or vocab.txt in %s: the text '
                    'tower is converted without a tokenizer (a sentencepiece-only one must be '
                    'saved as tokenizer.json with transformers first).', folder)
  elif text:
    tokenizer = hf_tokenizer.load(folder, family.NAME)
    if tokenizer.vocab_size > config.model.text.vocab_size:
      raise R.ConversionError(f'The tokenizer in {folder!r} has {tokenizer.vocab_size} tokens, '
                              f'more than the model\'s {config.model.text.vocab_size}.')
  return config, params, tokenizer


def load_hf(path: str) -> tuple[nn.Module, dict, Tokenizer | None]:
  """A Hugging Face checkpoint folder -> (model, params, tokenizer).

  Dual encoders (CLIP, SigLIP): `model.apply({'params': params}, images,
  method=model.encode_image)` with images [B, H, W, 3] in [0, 1] normalised by the checkpoint's
  preprocessor (`vlm_jax.convert.import_hf(path)[0].data.mean / std`), and
  `model.apply({'params': params}, ids, mask, method=model.encode_text)` with
  `tokenizer.encode_batch(texts, max_len)`. ViT: `model.apply(..., images)` -> dict of pooled,
  tokens (pooler_output). BERT: `model.apply(..., ids, mask)` -> dict of logits, tokens, pooled.
  BLIP-2 Q-Former: `model.apply(..., image_tokens, image_mask=None)` -> query outputs [B, Q, D].
  The tokenizer is None for models without text and folders without tokenizer files.
  """
  config, params, tokenizer = import_hf(path)
  return build(config), jax.tree.map(jnp.asarray, params), tokenizer


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with implicit sizes made explicit: text positions, the position grid, the fused
  width."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.text.max_len = config.model.text.max_len or config.data.max_text_len
  i = config.model.image
  i.posemb_grid = i.posemb_grid or config.data.image_size // i.patch_size
  config.model.fusion.width = config.model.fusion.width or config.model.text.width
  return config


def _architecture(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> dict:
  """model.* keys under `groups` (named explicitly, they override _NOT_ARCHITECTURE)."""
  flat = dict(config_utils.flatten(config.model.to_dict()))
  under = lambda k, names: any(k == n or k.startswith(n + '.') for n in names)
  keep = lambda k: under(k, groups) and (k in groups or not under(k, _NOT_ARCHITECTURE))
  return {k: v for k, v in flat.items() if k == 'name' or keep(k)}


def check_expressible(family: ModuleType, config: ml_collections.ConfigDict,
                      tokenizer: Tokenizer | None) -> None:
  """Raises ConversionError naming the keys of `config` that `family` cannot represent: the
  config, exported and imported back, must be the same architecture."""
  groups = {'dual_encoder': ('image', 'text', 'embed_dim', 'temperature'),
            'image_encoder': ('image',), 'masked_lm': ('text',),
            'qformer': _QFORMER_KEYS}[config.model.name]
  back = family.config_from_hf(family.config_to_hf(config, tokenizer), '', set())
  if config.model.name == 'image_encoder':
    back.model.image.pooler = config.model.image.pooler
  ours, theirs = _architecture(resolved(config), groups), _architecture(resolved(back), groups)
  differences = [f'model.{k}={ours.get(k)!r} (a {family.ARCHITECTURE} has {theirs.get(k)!r})'
                 for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  if differences:
    raise R.ConversionError(f'This model cannot be exported as a {family.ARCHITECTURE}: '
                            f'{"; ".join(differences)}.')


def export_hf(config: ml_collections.ConfigDict, params: Any, tokenizer: Tokenizer | None,
              folder: str, family_name: str = '') -> str:
  """Writes a Hugging Face folder (config.json, model.safetensors, preprocessor and tokenizer
  files) that transformers loads; returns the family name used."""
  options = EXPORTS.get(config.model.name, ())
  if not options:
    raise R.ConversionError(f'model.name {config.model.name!r} has no Hugging Face export; '
                            f'exportable: {", ".join(EXPORTS)}.')
  if not family_name:
    image = config.model.image
    family_name = 'siglip' if ('siglip' in options and image.pool == 'map') else options[0]
  if family_name not in options:
    raise R.ConversionError(f'A {config.model.name} exports as {", ".join(options)}, not '
                            f'{family_name!r}.')
  family = FAMILIES[family_name]
  check_expressible(family, config, tokenizer)
  params = relayout(jax.device_get(params), scan=False)
  tensors = R.to_tensors(family.rules(resolved(config)), params)
  os.makedirs(folder, exist_ok=True)
  for name, names in getattr(family, 'EXTRA_WEIGHTS', {}).items():
    hf_io.write_weights(folder, {n: tensors.pop(n) for n in names}, name)
  hf_io.write_json(os.path.join(folder, 'config.json'),
                   {**family.config_to_hf(config, tokenizer), 'dtype': 'float32'})
  hf_io.write_weights(folder, tensors)
  family.write_extras(folder, resolved(config))
  if tokenizer is not None:
    hf_tokenizer.save_hf(tokenizer, folder, model_max_length=resolved(config).model.text.max_len)
  return family_name


LORA_WEIGHTS = 'lora.safetensors'


def export_lora(folder: str, factors: Any, lora_cfg: ml_collections.ConfigDict) -> str:
  """Writes a LoRA run's factors (the 'lora' subtree, per layer) to `folder`/lora.safetensors,
  named by our parameter paths ('image_encoder/encoder/block_0/attn/qkv_kernel/a'), with rank
  and alpha in the metadata: kernel += alpha / rank * `vlm_jax.models.lora.delta(name, a, b)`."""
  tensors = {k: np.asarray(v, np.float32)
             for k, v in R.flatten(relayout(jax.device_get(factors), scan=False)).items()}
  path = os.path.join(folder, LORA_WEIGHTS)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tensors, path, metadata={'format': 'vlm_jax_lora', 'rank': str(lora_cfg.rank),
                                     'alpha': str(lora_cfg.alpha)})
  return path


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
