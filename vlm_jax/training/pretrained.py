"""Starting from pretrained parameters (`init.pretrained`, `init.include`).

The pretrained workdir (`python -m vlm_jax.convert --from=hf`, or a training run) brings the
config of what is loaded: `apply_config` copies into the run's config the towers whose
parameters are taken (`model.image` with `data.mean` / `data.std`; `model.text` with the
tokenizer), the projection width and the temperature when those are taken; the run keeps its
own dtype, remat, scan, dropout and data. `load_into_state` then replaces those parameters of
a freshly initialised state.
"""
import logging
import re
from typing import Any

import jax
import ml_collections

from vlm_jax import config_utils
from vlm_jax.convert import hf, workdir
from vlm_jax.convert import rules as R
from vlm_jax.training.state import TrainState

MODELS = ('dual_encoder',)
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
  paths = list(hf.param_shapes(pre))
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
    _copy_tower(pre.model.text, config.model.text)
    config.model.text.max_len = pre.model.text.max_len or pre.data.max_text_len
    tokenizer = workdir.tokenizer_path(path, pre)
    if tokenizer:
      config.data.tokenizer = tokenizer
    if config.data.max_text_len > config.model.text.max_len:
      raise PretrainedError(f'data.max_text_len={config.data.max_text_len} exceeds the '
                       f'{config.model.text.max_len} text positions of {path}; lower it.')
  if groups & {'image_proj', 'text_proj'}:
    config.model.embed_dim = pre.model.embed_dim
  if groups & {'t', 'b'}:
    config.model.temperature.update(pre.model.temperature.to_dict())
  changed = config_utils.diff(before, config.to_dict())
  logging.info('init.pretrained=%s: loading %d of %d parameter arrays (%s); config taken '
               'from it: %s', path, len(loaded), len(paths), ', '.join(sorted(groups)),
               '; '.join(changed) or 'nothing changed')
  return pre


def _copy_tower(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> None:
  for key, value in source.items():
    if key not in _KEEP:
      target[key] = value


def load_params(config: ml_collections.ConfigDict, like: Any) -> Any:
  """`like` (a parameter tree of the run's model) with the selected leaves replaced by the
  pretrained ones, placed like the leaves they replace."""
  try:
    loaded = workdir.load_params(config.init.pretrained)
  except workdir.WorkdirError as e:
    raise PretrainedError(f'init.pretrained: {e}') from None
  loaded = R.flatten(hf.relayout(loaded, scan=bool(config.model.scan_layers)))
  current = R.flatten(like)
  selected = _selected(tuple(config.init.include), loaded)
  missing = [p for p in selected if p not in current]
  wrong = [f'{p}: {tuple(loaded[p].shape)} vs {tuple(current[p].shape)}' for p in selected
           if p in current and tuple(loaded[p].shape) != tuple(current[p].shape)]
  if missing or wrong:
    raise PretrainedError(f'init.pretrained={config.init.pretrained} does not fit the model: '
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
