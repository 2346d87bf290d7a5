"""Starting from pretrained parameters (`init.pretrained`, `init.include`).

The pretrained workdir (`python -m vlm_jax.convert --from=hf`, or a training run) brings the
config of what is loaded: `apply_config` copies into the run's config the towers whose
parameters are taken (`model.image` with `data.mean` / `data.std`; `model.text` with the
tokenizer), the projection width and the temperature when those are taken; the run keeps its
own dtype, remat, scan, dropout and data. `load_into_state` then replaces those parameters of
a freshly initialised state.

BLIP-2 chains by checkpoint: stage 1 ('blip2_qformer') takes the image tower of a CLIP run;
stage 2 ('blip2') takes the image tower and the Q-Former ('qformer' parameters, with
`model.fusion`) of a stage-1 run, and with `init.lm` every parameter of a 'causal_lm' run as
its 'lm/' subtree (with `model.text` and the tokenizer).
"""
import logging
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax.convert import hf, workdir
from vlm_jax.convert import rules as R
from vlm_jax.training.state import TrainState

MODELS = ('dual_encoder', 'blip2_qformer', 'blip2')
_TRAINED_ONLY = ('blip2_qformer', 'blip2', 'causal_lm')  # no Hugging Face conversion
_KEEP = ('dropout',)  # tower keys that stay the run's own


class PretrainedError(ValueError):
  """`init.pretrained` cannot be used (unreadable workdir, wrong model, misfit)."""


def matches(patterns: tuple[str, ...], path: str) -> bool:
  """Whether any regex of `patterns` matches the start of '/'-joined `path` (re.match)."""
  return any(re.match(p, path) for p in patterns)


def _selected(patterns: tuple[str, ...], paths) -> list[str]:
  return [p for p in paths if not patterns or matches(patterns, p)]


def apply_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """Updates `config` in place from `config.init.pretrained`'s config; returns that config
  (None without `init.pretrained`). Raises ValueError for a workdir that cannot be used."""
  path = config.init.pretrained
  if config.init.lm and not path:
    raise PretrainedError('init.lm is loaded with init.pretrained (the image tower and Q-Former '
                          'of a blip2_qformer workdir): set both.')
  if not path:
    return None
  try:
    pre = workdir.merged_config(workdir.read_config(path))  # load_params merges LoRA
  except workdir.WorkdirError as e:
    raise PretrainedError(f'init.pretrained: {e}') from None
  for name in (pre.model.name, config.model.name):
    if name not in MODELS:
      raise PretrainedError(f'init.pretrained: a {name!r} model cannot be trained or evaluated '
                       f'from a pretrained workdir here; accepted: {", ".join(MODELS)}.')
  paths = _param_paths(pre)
  loaded = _selected(tuple(config.init.include), paths)
  if not loaded:
    raise PretrainedError(f'init.include={tuple(config.init.include)} matches no parameter of '
                     f'{path}; top-level groups: {sorted({p.split("/")[0] for p in paths})}.')
  groups = {p.split('/')[0] for p in loaded}
  before = config.to_dict()
  if 'image_encoder' in groups:
    _copy_tower(pre.model.image, config.model.image)
    i = config.model.image
    i.posemb_grid = i.posemb_grid or pre.data.image_size // i.patch_size
    config.data.mean, config.data.std = pre.data.mean, pre.data.std
  if 'text_encoder' in groups:
    _take_text(config, pre, path)
  if 'qformer' in groups:
    _copy_tower(pre.model.fusion, config.model.fusion)
  if groups & {'image_proj', 'text_proj'}:
    config.model.embed_dim = pre.model.embed_dim
  if groups & {'t', 'b'}:
    config.model.temperature.update(pre.model.temperature.to_dict())
  if config.init.lm:
    _apply_lm_config(config)
  changed = config_utils.diff(before, config.to_dict())
  logging.info('init.pretrained=%s: loading %d of %d parameter arrays (%s); config taken '
               'from it: %s', path, len(loaded), len(paths), ', '.join(sorted(groups)),
               '; '.join(changed) or 'nothing changed')
  return pre


def _copy_tower(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> None:
  for key, value in source.items():
    if key not in _KEEP:
      target[key] = value


def _take_text(config: ml_collections.ConfigDict, pre: ml_collections.ConfigDict,
               path: str) -> None:
  """`model.text`, its positions and the tokenizer of the workdir `path` (config `pre`)."""
  _copy_tower(pre.model.text, config.model.text)
  config.model.text.max_len = pre.model.text.max_len or pre.data.max_text_len
  tokenizer = workdir.tokenizer_path(path, pre)
  if tokenizer:
    config.data.tokenizer = tokenizer
  elif not config.data.tokenizer:  # the dataset's tokenizer would give other token ids
    raise PretrainedError(f'{path} has no tokenizer, so its text tower cannot read this run\'s '
                          'token ids: convert it with its tokenizer files, name its tokenizer '
                          "with --config.data.tokenizer, or load only the image tower "
                          "(--config.init.include='(\"image\",)').")
  if config.data.max_text_len > config.model.text.max_len:
    raise PretrainedError(f'data.max_text_len={config.data.max_text_len} exceeds the '
                          f'{config.model.text.max_len} text positions of {path}; lower it.')


def _apply_lm_config(config: ml_collections.ConfigDict) -> None:
  """The language model of `init.lm` (BLIP-2 stage 2): its text config and tokenizer."""
  path = config.init.lm
  if config.model.name != 'blip2':
    raise PretrainedError(f"init.lm is the language model of model.name='blip2' (BLIP-2 stage "
                          f'2), not of {config.model.name!r}; leave it empty.')
  try:
    lm = workdir.merged_config(workdir.read_config(path))
  except workdir.WorkdirError as e:
    raise PretrainedError(f'init.lm: {e}') from None
  if lm.model.name != 'causal_lm':
    raise PretrainedError(f'init.lm={path} holds a {lm.model.name!r} model; expected a '
                          "'causal_lm' workdir (e.g. of configs/lm_shapes.py).")
  _take_text(config, lm, path)
  config.model.decoder.tie_embeddings = lm.model.decoder.tie_embeddings


def _param_paths(config: ml_collections.ConfigDict) -> list[str]:
  """The '/'-joined parameter paths of the model of `config`, without allocating."""
  if config.model.name not in _TRAINED_ONLY:
    return list(hf.param_shapes(config))
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  size, length = config.data.image_size, config.data.max_text_len
  inputs = (jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32),
            jnp.ones((1, length), bool))
  return list(R.flatten(jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.key(0), *inputs)['params']))))


def _read_params(config: ml_collections.ConfigDict, key: str) -> dict[str, Any]:
  """The flat parameters of the workdir `config.init.<key>`, in the run's layer layout."""
  try:
    loaded = workdir.load_params(config.init[key])
  except workdir.WorkdirError as e:
    raise PretrainedError(f'init.{key}: {e}') from None
  return R.flatten(hf.relayout(loaded, scan=bool(config.model.scan_layers)))


def load_params(config: ml_collections.ConfigDict, like: Any) -> Any:
  """`like` (a parameter tree of the run's model) with the selected leaves replaced by the
  pretrained ones (with `init.lm`, also the 'lm/' subtree by the LM's), placed like the
  leaves they replace."""
  loaded = _read_params(config, 'pretrained')
  loaded = {p: loaded[p] for p in _selected(tuple(config.init.include), loaded)}
  if config.init.lm:
    loaded.update({f'lm/{p}': v for p, v in _read_params(config, 'lm').items()})
  current = R.flatten(like)
  selected = list(loaded)
  missing = [p for p in selected if p not in current]
  wrong = [f'{p}: {tuple(loaded[p].shape)} vs {tuple(current[p].shape)}' for p in selected
           if p in current and tuple(loaded[p].shape) != tuple(current[p].shape)]
  if missing or wrong:
    sources = ', '.join(f'init.{k}={config.init[k]}' for k in ('pretrained', 'lm')
                        if config.init[k])
    raise PretrainedError(f'{sources} does not fit the model: '
                     f'unknown parameters {missing[:5]}; shapes (pretrained vs model) '
                     f'{wrong[:5]}.')
  for p in selected:
    leaf = current[p]
    current[p] = jax.device_put(loaded[p].astype(leaf.dtype), leaf.sharding)
  return R.unflatten(current)


def load_into_state(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
  """A fresh `state` with the pretrained parameters of `config.init` (optimizer state as
  initialised: it does not depend on the parameter values)."""
  return state.replace(params=load_params(config, state.params))
