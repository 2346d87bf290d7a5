"""Config checks shared by the entry points: unknown keys, bad values, config identity."""
import difflib
import importlib.util
import json
import math
import os
import re
from typing import Any, Iterator

import ml_collections

from vlm_jax import defaults


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
  from vlm_jax.data import datasets, image_convert, image_text_folder, pipeline
  from vlm_jax.encoders import resnet, text, vit
  from vlm_jax.models import blip2, fusion_encoder
  from vlm_jax.nn.transformer import REMAT_CHOICES
  from vlm_jax.training import nonfinite, objectives, optimizer, partitioning
  # pylint: enable=g-import-not-at-top
  choices = {
      'data.name': (*datasets.BUILDERS, image_text_folder.NAME),
      'data.resize': image_convert.RESIZE_MODES,
      'data.encoding': image_text_folder.ENCODINGS,
      'data.hard_negative_kinds': pipeline.HARD_NEGATIVE_KINDS,
      'model.name': tuple(models.MODELS),
      'model.dtype': models.DTYPES,
      'model.param_dtype': models.DTYPES,
      'model.remat': REMAT_CHOICES,
      'model.image.name': tuple(models.IMAGE_TOWERS),
      'model.image.norm': resnet.NORMS,
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
  if config.data.name in datasets.BUILDERS:
    choices['data.builder_config'] = tuple(datasets.BUILDERS[config.data.name].builder_configs)
  if config.model.image.name == 'vit':
    choices.update({'model.image.pool': vit.POOLS, 'model.image.posemb': vit.POSEMBS})
  return choices


_INTERVAL = re.compile(r'([\[(])\s*(-?inf|[-+.\deE]+)\s*,\s*(-?inf|[-+.\deE]+)\s*([\])])')


def _parse_range(spec: str | tuple[str, dict]) -> tuple[tuple[str, float, float, str], dict]:
  """((open bracket, low, high, close bracket), sentinels) of a `defaults.RANGES` entry."""
  interval, sentinels = spec if isinstance(spec, tuple) else (spec, {})
  match = _INTERVAL.fullmatch(interval.strip())
  if not match:
    raise ValueError(f'Bad range {interval!r} in vlm_jax/defaults.py RANGES.')
  left, low, high, right = match.groups()
  return (left, float(low), float(high), right), sentinels


def _in_interval(value: float, interval: tuple[str, float, float, str]) -> bool:
  left, low, high, right = interval
  above = value >= low if left == '[' else value > low
  below = value <= high if right == ']' else value < high
  return above and below and not math.isnan(value)


def _describe(interval: tuple[str, float, float, str], sentinels: dict, integer: bool) -> str:
  """'an integer >= 1, or 0 (off)', 'a number in [0, 1)', ... for error messages."""
  left, low, high, right = interval
  kind = 'an integer' if integer else 'a number'
  if math.isinf(low) and math.isinf(high):
    text = kind + (', -inf or inf' if left + right == '[]' else '')
  elif math.isinf(high):
    text = f'{kind} {">=" if left == "[" else ">"} {low:g}'
  elif math.isinf(low):
    text = f'{kind} {"<=" if right == "]" else "<"} {high:g}'
  else:
    text = f'{kind} in {left}{low:g}, {high:g}{right}'
  extra = ''.join(f', or {value} ({meaning})' for value, meaning in sentinels.items())
  return text + extra


def _check_range(key: str, value: Any, spec) -> None:
  """Raises ValueError unless `value` (or each element of a tuple) is in range `spec`."""
  interval, sentinels = _parse_range(spec)
  elements = value if isinstance(value, (tuple, list)) else (value,)
  for element in elements:
    if isinstance(element, bool) or not isinstance(element, (int, float)):
      raise ValueError(f'Config value {key}={value!r} is not a number; accepted: '
                       f'{_describe(interval, sentinels, False)}.')
    if element in sentinels and not isinstance(value, (tuple, list)):
      continue
    if not _in_interval(element, interval):
      integer = isinstance(element, int)
      raise ValueError(f'Config value {key}={value!r} is out of range: it must be '
                       f'{_describe(interval, sentinels, integer)}.')


def _check_temperature(values: dict[str, Any]) -> str | None:
  low, high = values['model.temperature.min'], values['model.temperature.max']
  init = values['model.temperature.init']
  if not low <= init <= high:
    return (f'model.temperature.init={init!r} must lie in [model.temperature.min, '
            f'model.temperature.max] = [{low!r}, {high!r}] (the learned log-scale is clipped '
            'to that interval)')
  return None


def _check_warmup(values: dict[str, Any]) -> str | None:
  warmup, steps = values['optim.warmup_steps'], values['train.num_steps']
  if warmup > steps:
    return (f'optim.warmup_steps={warmup} must be <= train.num_steps={steps} (the run would '
            'end before reaching the learning rate); lower warmup_steps or raise num_steps')
  return None


def _check_microbatches(values: dict[str, Any]) -> str | None:
  batch, micro = values['train.batch_size'], values['train.microbatches']
  if batch % micro:
    return (f'train.microbatches={micro} must divide train.batch_size={batch}')
  return None


def _check_fractions(values: dict[str, Any]) -> str | None:
  total = values['data.val_fraction'] + values['data.test_fraction']
  if total >= 1:
    return (f'data.val_fraction + data.test_fraction = {total:g} leaves nothing for train; '
            'keep the sum < 1')
  return None


def _check_mesh(values: dict[str, Any]) -> str | None:
  rest = [k for k in ('data', 'fsdp', 'tensor') if values[f'parallel.mesh.{k}'] == -1]
  if len(rest) > 1:
    return (f'parallel.mesh: only one axis may be -1 (the remaining devices), got '
            f'{", ".join(rest)}')
  return None


def _check_heads(values: dict[str, Any]) -> str | None:
  towers = ['model.text'] + (['model.image'] if values['model.image.name'] == 'vit' else [])
  for tower in towers:
    width, heads = values[f'{tower}.width'], values[f'{tower}.num_heads']
    if width % heads:
      return f'{tower}.num_heads={heads} must divide {tower}.width={width}'
  return None


# Rules between keys: each returns None or what is wrong and what is accepted.
_CROSS_RULES = (_check_temperature, _check_warmup, _check_microbatches, _check_fractions,
                _check_mesh, _check_heads)


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key, the value and what it accepts for a value no component
  takes (a misspelt loss, fusion layer, model, ...), a number out of its range in
  `defaults.RANGES`, or keys that do not fit together, so that the mistake costs a line at
  start-up, not a dataset build, a compilation and a run that trains uphill."""
  values = dict(flatten(config))
  for key, accepted in _choices(config).items():
    value = values.get(key)
    given = value if isinstance(value, (tuple, list)) else (value,)
    if key in values and any(v not in accepted for v in given):
      raise ValueError(f'Config value {key}={value!r} is not accepted; accepted: '
                       f'{", ".join(repr(a) for a in accepted)}.')
  for key, spec in defaults.RANGES.items():
    if key in values:
      _check_range(key, values[key], spec)
  for rule in _CROSS_RULES:
    problem = rule(values)
    if problem:
      raise ValueError(f'Config values do not fit: {problem}.')


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
