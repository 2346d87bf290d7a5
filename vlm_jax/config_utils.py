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
