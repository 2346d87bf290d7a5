"""Shared plumbing for the absl entry points: config flag, clean errors instead of tracebacks."""
import importlib.util
import logging
import os
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from vlm_jax import config_utils


class UserError(Exception):
  """An error caused by the user's input; printed as one line, without a traceback."""


# A ValueError raised by code in these folders is a check of the user's input (a config
# value, a file, a flag) with a message written to be read: printed as one line like a
# UserError. Raised anywhere else (JAX, NumPy) it is a bug, shown with its traceback.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_OWN_CODE = (_PACKAGE + os.sep, os.path.join(os.path.dirname(_PACKAGE), 'experiments') + os.sep)
TRACEBACK_ENV = 'VLM_JAX_TRACEBACK'  # set to 1 for the traceback of every error
_FLAG_VALUE = re.compile(r'flag --config\.([\w.]+)=(.*?): (.*)', re.S)


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
    message = str(e)
    value_error = _FLAG_VALUE.match(message)
    if value_error:
      _fail(_explain_value_error(argv, *value_error.groups()))
    if message.startswith('flag --config=') and '\n' in message:  # with a traceback
      _fail(_explain_config_error(argv, e))
    _fail(one_line(message))
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


def one_line(message: str) -> str:
  return ' '.join(message.split())


def _config_spec(argv: list[str]) -> str | None:
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)


def _explain_value_error(argv: list[str], key: str, text: str, reason: str) -> str:
  """`--config.KEY=TEXT` that does not parse as the key's type: names the type."""
  if reason.startswith("('Non-boolean argument"):
    reason = 'expected true or false'
  try:
    value = _load_config_file(_config_spec(argv))
    for part in key.split('.'):
      value = value[part]
  except Exception:  # pylint: disable=broad-except
    return one_line(f'Bad value {text!r} for config key "{key}": {reason}')
  return one_line(config_utils.bad_value(key, text, value, reason))


def _explain_config_error(argv: list[str], error: Exception) -> str:
  spec = _config_spec(argv)
  if spec is None:
    return one_line(str(error))
  path = spec.partition(':')[0]
  if not os.path.exists(path):
    return f'config file {path!r} does not exist (expected configs/NAME.py[:VARIANT]).'
  try:
    config = _load_config_file(spec)
  except AttributeError as e:
    if 'get_config' in str(e):
      return f'config file {path!r} has no get_config() function.'
    return f'loading config {spec!r} failed: {e}'
  except ValueError as e:  # the config's own check, e.g. an unknown variant
    return one_line(f'config {spec!r}: {e}')
  except Exception as e:  # pylint: disable=broad-except
    return one_line(f'loading config {spec!r} failed: {type(e).__name__}: {e}')
  try:
    config_utils.check_overrides(config, argv)
  except ValueError as e:
    return str(e)
  return one_line(f'bad config value: {error}')


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


def refuse_positional(argv: list[str], allowed: int = 0) -> None:
  """Raises UserError for arguments that are not flags beyond the first `allowed` (argv[0] is
  the program): an unquoted value with spaces would otherwise lose its words silently."""
  extra = argv[1 + allowed:]
  if extra:
    raise UserError(f'Unexpected argument(s) {" ".join(repr(a) for a in extra)}: every value '
                    'is given as --name=value; quote a value that has spaces, e.g. '
                    '--question="how many objects".')


def run(main: Callable[[list[str]], None], positional: int = 0) -> None:
  """`app.run(main)` with clean errors for config mistakes and `UserError`s; arguments that
  are not flags, beyond `positional` of them (e.g. a command), are an error."""
  def wrapped(argv):
    quiet_library_logs()
    try:
      refuse_positional(argv, positional)
      main(argv)
    except UserError as e:
      if os.environ.get(TRACEBACK_ENV) == '1':
        raise
      _fail(one_line(str(e)))
    except ValueError as e:
      if os.environ.get(TRACEBACK_ENV) == '1' or not raised_by_own_code(e):
        raise
      _fail(one_line(str(e)))
  app.run(wrapped, flags_parser=_parse_flags)


def raised_by_own_code(error: BaseException) -> bool:
  """Whether `error` was raised in this package or experiments/ (see _OWN_CODE)."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_CODE)


def load_config(flag, argv_all: list[str]):
  """The parsed config, after checking the command line for unknown keys."""
  try:
    config = flag.value
    if config is None:
      raise UserError('--config is required, e.g. --config=configs/clip_shapes.py')
    config_utils.check_overrides(config, argv_all)
    config_utils.check_values(config)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # config_flags defers load failures to the first attribute access.
    raise UserError(_explain_config_error(argv_all, e)) from None
  return config
