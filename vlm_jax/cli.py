"""Shared plumbing for the absl entry points: config flag, clean errors instead of tracebacks."""
import importlib.util
import logging
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from vlm_jax import config_utils


class UserError(Exception):
  """An error caused by the user's input; printed as one line, without a traceback."""


def define_config_flag():
  return config_flags.DEFINE_config_file(
      'config', None,
      'Config file, `configs/NAME.py[:VARIANT]`; override values with `--config.KEY=VALUE`.',
      lock_config=True)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, turning config mistakes into one-line errors."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # ml_collections raises these for unknown keys and mistyped values.
    _fail(_explain_config_error(argv, e))
  return rest


def _load_config_file(spec: str):
  """Loads `path.py[:arg]` the way config_flags does, for error messages."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_vlm_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _explain_config_error(argv: list[str], error: Exception) -> str:
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return str(error).replace('\n', ' ')
  path = spec.partition(':')[0]
  if not os.path.exists(path):
    return f'config file {path!r} does not exist (expected configs/NAME.py[:VARIANT]).'
  try:
    config = _load_config_file(spec)
  except AttributeError as e:
    if 'get_config' in str(e):
      return f'config file {path!r} has no get_config() function.'
    return f'loading config {spec!r} failed: {e}'
  except Exception as e:  # pylint: disable=broad-except
    return f'loading config {spec!r} failed: {type(e).__name__}: {e}'
  try:
    config_utils.check_overrides(config, argv)
  except ValueError as e:
    return str(e)
  return f'bad config value: {error}'.replace('\n', ' ')


_CHATTY_LIBRARIES = ('/orbax/', '/tensorboardX/', '/tensorflow_datasets/', '/grain/')


class _QuietLibraries(logging.Filter):
  """Drops INFO records of libraries whose INFO logs would drown the training log."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(lib in record.pathname for lib in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with clean errors for config mistakes and `UserError`s."""
  def wrapped(argv):
    quiet_library_logs()
    try:
      main(argv)
    except UserError as e:
      logging.error('%s', e)
      _fail(str(e))
  app.run(wrapped, flags_parser=_parse_flags)


def load_config(flag, argv_all: list[str]):
  """The parsed config, after checking the command line for unknown keys."""
  try:
    config = flag.value
    if config is None:
      raise UserError('--config is required, e.g. --config=configs/clip_shapes.py')
    config_utils.check_overrides(config, argv_all)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # config_flags defers load failures to the first attribute access.
    raise UserError(_explain_config_error(argv_all, e)) from None
  return config
