"""Pretrained workdirs: what `python -m vlm_jax.convert --from=hf` writes and
`init.pretrained` reads.

  WORKDIR/config.json         the full config (model, preprocessing in data.mean / data.std)
  WORKDIR/params/             an orbax checkpoint of the parameter tree
  WORKDIR/tokenizer.json      the checkpoint's tokenizer (+ special_tokens.json), if any

A training workdir (config.json and checkpoints/) reads the same way: the parameters of its
latest checkpoint, and the tokenizer its config names. A LoRA run's factors (`model.lora`) are
merged into its kernels by default, and the config read with them is then that of the merged
model (`merged_config`).
"""
import difflib
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vlm_jax import config_utils
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.defaults import base_config
from vlm_jax.models import lora

PARAMS = 'params'
TOKENIZER = 'tokenizer.json'


class WorkdirError(ValueError):
  """A pretrained workdir that cannot be read (missing files, unknown config options)."""


def _as_tuples(value: Any) -> Any:
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _update(target: ml_collections.ConfigDict, values: dict, prefix: str, source: str) -> None:
  for key, value in values.items():
    path = f'{prefix}{key}'
    if key not in target:
      near = difflib.get_close_matches(key, list(target.keys()), n=1)
      hint = f' (nearest known: {prefix}{near[0]})' if near else ''
      raise WorkdirError(f'{source} names the option {path!r}, which this version of vlm_jax '
                         f'does not support{hint}.')
    if isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _update(target[key], value, path + '.', source)
    else:
      try:
        target[key] = _as_tuples(value)
      except (TypeError, ValueError) as e:
        raise WorkdirError(f'{source}: option {path!r} has an invalid value {value!r} '
                           f'({e}).') from None


def config_from_json(values: dict, source: str) -> ml_collections.ConfigDict:
  """The defaults updated by `values` (a config.json); unknown options are an error naming
  them."""
  config = base_config()
  _update(config, values, '', source)
  return config


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'No config.json in {workdir!r}: expected a workdir written by '
                       'python -m vlm_jax.convert or by a training run.')
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise WorkdirError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}); it is '
                         'written by the run or conversion that made the workdir.') from None
  if not isinstance(values, dict):
    raise WorkdirError(f'{path} holds {type(values).__name__}, not a config object.')
  return config_from_json(values, path)


def save(workdir: str, config: ml_collections.ConfigDict, params: Any,
         tokenizer: tokenizer_lib.Tokenizer | None) -> None:
  """Writes config.json, params/ and the tokenizer files into a new `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config_utils.to_json(config))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(workdir, PARAMS)), params)
  if tokenizer is not None:
    tokenizer.save(os.path.join(workdir, TOKENIZER))


def tokenizer_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The tokenizer of a pretrained workdir: its own file; for a training workdir, the one its
  config used; '' for a converted checkpoint without a tokenizer."""
  own = os.path.join(workdir, TOKENIZER)
  if os.path.isfile(own):
    return own
  if os.path.isdir(os.path.join(workdir, PARAMS)):
    return ''
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.tokenizer_path(config.data)


def merged_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` without LoRA (`model.lora.rank` 0): the config of merged parameters."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.lora.rank = 0
  return config


def load_params(workdir: str, merge_lora: bool = True) -> Any:
  """The parameter tree (host arrays) of a converted or a training workdir; a LoRA run's
  factors merged into the kernels, or with `merge_lora=False` kept in its 'lora' subtree."""
  params_dir = os.path.abspath(os.path.join(workdir, PARAMS))
  if os.path.isdir(params_dir):
    with ocp.StandardCheckpointer() as checkpointer:
      return jax.device_get(checkpointer.restore(params_dir))
  checkpoints = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  manager = ocp.CheckpointManager(checkpoints, item_names=('state', 'data', 'meta')) \
      if os.path.isdir(checkpoints) else None
  step = manager.latest_step() if manager else None
  if step is None:
    raise WorkdirError(f'{workdir!r} holds no parameters: expected params/ (vlm_jax.convert) '
                       'or checkpoints/ with at least one step (a training run).')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  params = jax.device_get(restored['state']['params'])
  if merge_lora and lora.PARAMS_KEY in params:
    params = jax.device_get(lora.merge_params(params, read_config(workdir).model.lora))
  return params


def load(workdir: str, merge_lora: bool = True
         ) -> tuple[ml_collections.ConfigDict, Any, tokenizer_lib.Tokenizer | None]:
  """(config, parameters, tokenizer or None) of a pretrained workdir; LoRA factors merged
  (and the config then `merged_config`) unless `merge_lora` is False."""
  config = read_config(workdir)
  params = load_params(workdir, merge_lora)
  if merge_lora:
    config = merged_config(config)
  tokenizer = None
  if config.model.name != 'image_encoder':
    path = tokenizer_path(workdir, config)
    if path and os.path.isfile(path):
      tokenizer = tokenizer_lib.Tokenizer.from_file(path)
  return config, params, tokenizer
