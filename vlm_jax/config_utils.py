"""Config checks shared by the entry points: unknown keys, bad values, config identity."""
import difflib
import importlib.util
import json
import os
from typing import Any, Iterator

import ml_collections


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = '') -> Iterator[tuple[str, Any]]:
  """Yields (`dotted.key`, value) for every leaf of a (nested) config."""
  items = config.items() if hasattr(config, 'items') else []
  for key, value in items:
    path = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
      yield from flatten(value, path + '.')
    else:
      yield path, value


def nearest_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """The valid dotted key closest to `key`, or None when nothing is close."""
  keys = [k for k, _ in flatten(config)]
  match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
  return match[0] if match else None


def check_overrides(config: ml_collections.ConfigDict, argv: list[str], flag: str = 'config') -> None:
  """Raises ValueError naming the nearest valid key for any unknown `--config.KEY=...`."""
  valid = {k for k, _ in flatten(config)}
  groups = {k.rsplit('.', 1)[0] for k in valid if '.' in k}
  for arg in argv:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if key in valid or key in groups:
      continue
    near = nearest_key(config, key)
    hint = f' Did you mean "{near}"?' if near else ''
    raise ValueError(f'Unknown config key "{key}".{hint} '
                     f'Valid top-level groups: {", ".join(sorted(config.keys()))}.')


def bad_value(key: str, text: str, current: Any, reason: str) -> str:
  """The message for `text` that does not parse as config key `key` (now `current`)."""
  return (f'Bad value {text!r} for config key "{key}" (type {type(current).__name__}, '
          f'default {current!r}): {reason}')


def _choices(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """Dotted key -> the values it accepts, from the registries that use them."""
  # pylint: disable=g-import-not-at-top
  from vlm_jax import fusion, losses, models
  from vlm_jax.data import datasets, image_convert, image_text_folder
  from vlm_jax.encoders import text, vit
  from vlm_jax.models import blip2, fusion_encoder
  from vlm_jax.nn.transformer import REMAT_CHOICES
  from vlm_jax.training import nonfinite, objectives, optimizer, partitioning
  # pylint: enable=g-import-not-at-top
  choices = {
      'data.name': (*datasets.BUILDERS, image_text_folder.NAME),
      'data.resize': image_convert.RESIZE_MODES,
      'data.encoding': image_text_folder.ENCODINGS,
      'model.name': tuple(models.MODELS),
      'model.dtype': models.DTYPES,
      'model.param_dtype': models.DTYPES,
      'model.remat': REMAT_CHOICES,
      'model.image.name': tuple(models.IMAGE_TOWERS),
      'model.text.name': tuple(models.TEXT_TOWERS),
      'model.text.pool': text.POOLS,
      'model.fusion.name': ('', *sorted(fusion.FUSION_LAYERS)),
      'model.fusion.pool': fusion_encoder.POOLS,
      'model.blip2.adapter': blip2.ADAPTERS,
      'loss.name': losses.available_losses(),
      'loss.positives': objectives.POSITIVES,
      'optim.name': optimizer.OPTIMIZERS,
      'optim.schedule': optimizer.SCHEDULES,
      'parallel.mode': partitioning.MODES,
      'train.nonfinite': nonfinite.MODES,
  }
  if config.model.image.name == 'vit':
    choices.update({'model.image.pool': vit.POOLS, 'model.image.posemb': vit.POSEMBS})
  return choices


# Integer keys and their smallest sensible value.
_MINIMUMS = {'data.image_size': 1, 'data.max_text_len': 2, 'train.batch_size': 1,
             'train.num_steps': 0, 'train.microbatches': 1, 'train.log_every_steps': 1,
             'eval.batch_size': 1, 'checkpoint.keep': 1, 'checkpoint.every_steps': 0,
             'data.curriculum.steps': 0, 'data.curriculum.max_objects': 1}
# Probabilities: every key of these groups whose name ends in 'probability'.
_PROBABILITY_GROUPS = ('loss.',)


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and what it accepts for a value no component takes
  (a misspelt loss, fusion layer, model, ...) or a size out of range, so that the mistake
  costs a line at start-up, not a dataset build and a compilation."""
  values = dict(flatten(config))
  for key, accepted in _choices(config).items():
    if key in values and values[key] not in accepted:
      raise ValueError(f'Config value {key}={values[key]!r} is not accepted; accepted: '
                       f'{", ".join(repr(a) for a in accepted)}.')
  for key, minimum in _MINIMUMS.items():
    if key in values and values[key] < minimum:
      raise ValueError(f'Config value {key}={values[key]!r} is out of range: it must be an '
                       f'integer >= {minimum}.')
  for key, value in values.items():
    if (key.startswith(_PROBABILITY_GROUPS) and key.endswith('probability')
        and not 0 <= value <= 1):
      raise ValueError(f'Config value {key}={value!r} is out of range: it must be a '
                       'probability in [0, 1].')


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as indented JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def diff(a: dict, b: dict, defaults: dict | None = None) -> list[str]:
  """Dotted keys whose values differ between two (nested) plain dicts, as readable lines.

  `defaults`: a dict of the same layout whose values stand in for keys missing from `a`
  (a config saved before those keys existed had their default behaviour).
  """
  fa, fb = dict(flatten(a)), dict(flatten(b))
  for key, value in flatten(defaults or {}):
    fa.setdefault(key, value)
  lines = []
  for key in sorted(set(fa) | set(fb)):
    va, vb = fa.get(key, '<missing>'), fb.get(key, '<missing>')
    if isinstance(va, tuple):
      va = list(va)
    if isinstance(vb, tuple):
      vb = list(vb)
    if va != vb:
      lines.append(f'{key}: {va!r} vs {vb!r}')
  return lines


def sibling_config(config_file: str, name: str, arg: str | None = None
                   ) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `configs/<name>.py` beside `config_file`: lets one config file
  start from another (`sibling_config(__file__, 'clip_shapes', arg)`)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'Config {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(f'_vlm_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
