"""Orbax checkpoints of the train state, the input pipeline's state and the model config.

Each step is one orbax checkpoint with three items: `state` (params, optimizer state, step,
non-finite counts), `data` (JSON: the grain iterator state, whether an evaluation is pending,
and a fingerprint of `state`) and `meta` (the model config, JSON).

What survives what:
- A killed save: orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when
  complete, so the previous checkpoints stay the latest complete ones; the next training run
  (`training=True`) removes the leftover.
- A damaged checkpoint: `restore_latest` warns, moves it to `<workdir>/checkpoints.unusable/`
  and falls back to the previous one; if none is readable it raises UnusableCheckpointError
  and moves nothing. Damage needs evidence: a file that differs from the size and CRC32
  recorded in the step's `integrity.json` once its save completed, arrays that do not match
  the fingerprint, or a format error from orbax (a missing file or item, bytes it cannot
  parse). Checkpoints written before the record existed are judged by the last two.
- A checkpoint that cannot be read for another reason (an I/O or permission error, host
  memory running out): CheckpointReadError, and nothing is moved, so that the same command
  resumes from it once the cause is gone.
- Readers (`vlm_jax.evaluate`, `vlm_jax.generate`): `restore_latest(read_only=True)` uses the
  newest checkpoint that restores and moves nothing.
- A failed write (full disk, unwritable directory): CheckpointWriteError naming the directory,
  the step and the cause; the earlier checkpoints are intact.
- A checkpoint of another model config, or a state of another structure (e.g. another
  optimizer): CheckpointMismatchError, never a fall-back.
"""
import contextlib
import json
import logging
import os
import re
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vlm_jax import config_utils
from vlm_jax import defaults
from vlm_jax.training import fingerprint as fingerprint_lib
from vlm_jax.training import nonfinite

UNUSABLE_DIR = 'checkpoints.unusable'  # beside `checkpoints/`, where damaged steps are moved
INTEGRITY_FILE = 'integrity.json'  # in each step's directory: {path: [size, crc32]} of its files
# tensorstore reports errors as ValueError('STATUS: ...'). These statuses say that the bytes on
# disk are not a valid checkpoint; others (PERMISSION_DENIED, UNAVAILABLE, RESOURCE_EXHAUSTED,
# ...) that reading them failed, which is no evidence of damage.
_FORMAT_STATUSES = ('NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS', 'INVALID_ARGUMENT',
                    'FAILED_PRECONDITION')
_STATUS = re.compile(r'([A-Z][A-Z_]+): ')


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of another model config."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, unwritable directory, ...)."""


class UnusableCheckpointError(OSError):
  """The workdir holds checkpoints, but none of them can be read."""


class CheckpointReadError(OSError):
  """A checkpoint could not be read for a reason that is not damage (I/O, permission, memory)."""


class DamagedCheckpointError(ValueError):
  """Evidence that a checkpoint's bytes changed after it was saved."""


def is_damage(error: BaseException) -> bool:
  """Whether `error`, raised while restoring a checkpoint, is evidence that it is damaged."""
  if isinstance(error, (DamagedCheckpointError, FileNotFoundError)):
    return True  # a recorded file differs or is gone
  if isinstance(error, (OSError, MemoryError)):
    return False
  if isinstance(error, ValueError):  # orbax's and tensorstore's format errors, bad JSON
    status = _STATUS.match(str(error))
    return status is None or status.group(1) in _FORMAT_STATUSES
  return isinstance(error, KeyError)  # orbax: an item missing from the checkpoint


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      crc = zlib.crc32(block, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  """Paths, relative to `step_dir`, of the files of a checkpoint (not its record)."""
  found = []
  for root, _, names in os.walk(step_dir):
    found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in found if f != INTEGRITY_FILE)


def write_integrity(step_dir: str) -> None:
  """Records the size and CRC32 of every file of a completed checkpoint (atomically)."""
  files = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
           for f in _files(step_dir)}
  path = os.path.join(step_dir, INTEGRITY_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump({'version': 1, 'files': files}, f)
  os.replace(path + '.tmp', path)


def verify_integrity(step_dir: str) -> bool:
  """Checks a checkpoint's files against its record; False if it has none (written before
  records existed, or its process stopped before writing it). Raises DamagedCheckpointError
  for a missing or changed file; OSError when a file cannot be read."""
  path = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpointError(f'its {INTEGRITY_FILE} is unreadable ({e})') from None
  for name, (size, crc) in files.items():
    file = os.path.join(step_dir, name)
    if not os.path.exists(file):
      raise DamagedCheckpointError(f'its file {name} is missing')
    if os.path.getsize(file) != size:
      raise DamagedCheckpointError(f'its file {name} has {os.path.getsize(file)} bytes, '
                                   f'{size} when saved')
    if _crc32(file) != crc:
      raise DamagedCheckpointError(f'the bytes of its file {name} changed after saving (CRC32)')
  return True


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """What must match for a checkpoint to be restored into a model built from `config`."""
  return {'model': config.model.to_dict()}


def _key_paths(tree: Any) -> set[str]:
  """'a/b/0'-style paths of a tree's leaves (attribute, dict and sequence keys alike)."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(name(k) for k in path) for path, _ in flat}


def _worst_outcome(outcome: int) -> int:
  """The largest `outcome` over all processes (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _describe(error: BaseException) -> str:
  """One line: the error's type and the first line of its message."""
  if isinstance(error, OSError) and error.strerror:
    text = f'{error.strerror} (errno {error.errno})'
    text += f': {error.filename}' if error.filename else ''
  else:
    text = (str(error).splitlines() or [''])[0]
  return f'{type(error).__name__}: {text[:300]}'.rstrip(': ')


class Checkpointer:
  """Saves every `checkpoint.every_steps`, keeps `checkpoint.keep`, restores the latest usable."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, training: bool = False):
    """`training`: this process writes the checkpoints, so unfinished saves found in the
    directory are leftovers of a killed run and are removed (a reader, such as an evaluation
    beside a running training, must leave them)."""
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        cleanup_tmp_directories=training,
        create=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={'state': ocp.StandardCheckpointHandler(),
                         'data': ocp.JsonCheckpointHandler(),
                         'meta': ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise CheckpointWriteError(f'Cannot create the checkpoint directory {self.directory}: '
                                 f'{e.strerror or e}. Choose another --workdir.') from e
    self._in_flight: int | None = None  # the step of an asynchronous save not yet waited for
    self.skipped: list[tuple[int, str]] = []  # damaged (step, why) the last restore passed over

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # Saving.

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Starts saving `state` and `data_state` (JSON) as step `step`; raises
    CheckpointWriteError for this or an earlier asynchronous save that failed."""
    self.wait()
    data = dict(data_state or {}, fingerprint=fingerprint_lib.fingerprint(state))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(model_signature(self._config)))
    with self._write_errors(step):
      saved = self._manager.save(step, args=args, force=force)
    self._in_flight = step if saved else None
    return saved

  def wait(self) -> None:
    """Waits for an asynchronous save and records its files' sizes and CRC32s; raises
    CheckpointWriteError if it failed."""
    step, self._in_flight = self._in_flight, None
    with self._write_errors(step):
      self._manager.wait_until_finished()
      if step is not None and jax.process_index() == 0:
        write_integrity(self._step_dir(step))

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def close(self, raise_errors: bool = True) -> None:
    """Finishes a save in flight and releases the manager. `raise_errors=False` (while
    another exception propagates) logs a failed save instead of raising."""
    try:
      self.wait()
    except CheckpointWriteError as e:
      if raise_errors:
        raise
      logging.error('%s', e)
    finally:
      # orbax's close() does not join the thread that cleans up temporary directories; a
      # process that exits right after would print that thread's traceback.
      self._manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
      self._manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns any exception of a save into a CheckpointWriteError that says what to do."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
    self._manager.reload()
    intact = self.all_steps()
    what = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
    cause = (f'{error.strerror} (errno {error.errno})' if isinstance(error, OSError) and
             error.strerror else f'{type(error).__name__}: {error}')
    kept = (f'the earlier checkpoints (steps {", ".join(map(str, intact))}) are intact, and '
            f'the same command resumes from step {intact[-1]}' if intact else
            'no earlier checkpoint exists')
    return CheckpointWriteError(
        f'Could not write {what} to {self.directory}: {cause}. Free disk space or make the '
        f'directory writable; {kept}.')

  # Restoring.

  def check_compatible(self, step: int) -> None:
    """Raises CheckpointMismatchError if checkpoint `step` belongs to another model config."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved, current = meta['meta'], model_signature(self._config)
    # Keys added to the schema after the checkpoint was written count at their defaults.
    differences = config_utils.diff(saved, current, model_signature(defaults.base_config()))
    if differences:
      shown = '; '.join(differences[:5])
      raise CheckpointMismatchError(
          f'{self.directory} holds a checkpoint (step {step}) of another model config '
          f'(checkpoint vs now: {shown}). Use a new --workdir, or the config it was trained with.')

  def _check_structure(self, step: int, abstract_state: Any) -> bool:
    """Raises CheckpointMismatchError if the saved state's leaves are not those of
    `abstract_state`; returns False for a checkpoint from before `health` existed."""
    saved = _key_paths(self._manager.item_metadata(step)['state'])
    if not saved:
      raise ValueError('it has no readable train state')  # damaged, not another config
    wanted = _key_paths(abstract_state)
    has_health = any(p.startswith('health/') for p in saved)
    if not has_health:
      wanted = {p for p in wanted if not p.startswith('health/')}
    if saved != wanted:
      missing, extra = sorted(wanted - saved), sorted(saved - wanted)
      raise CheckpointMismatchError(
          f'{self.directory} holds a checkpoint (step {step}) whose train state differs from '
          f'the one this config builds (missing from the checkpoint: {missing[:3]}; only in '
          f'the checkpoint: {extra[:3]}), e.g. another optimizer or frozen set. Use a new '
          '--workdir, or the config it was trained with.')
    return has_health

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the shapes and shardings of `abstract_state` (a
    TrainState of ShapeDtypeStructs) and checks its files' record and its fingerprint;
    returns (state, data). Raises DamagedCheckpointError for files or arrays that changed."""
    verify_integrity(self._step_dir(step))
    self.check_compatible(step)
    has_health = self._check_structure(step, abstract_state)
    target = abstract_state if has_health else {
        'step': abstract_state.step, 'params': abstract_state.params,
        'opt_state': abstract_state.opt_state}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state, data = restored['state'], dict(restored['data'])
    expected = data.pop('fingerprint', None)
    if expected is not None and fingerprint_lib.fingerprint(state) != expected:
      raise DamagedCheckpointError('its arrays do not match the fingerprint recorded when it '
                                   'was saved (the files were altered after saving)')
    if not has_health:  # written before non-finite steps were counted
      health = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), nonfinite.init(),
                            abstract_state.health)
      state = type(abstract_state)(**state, health=health)
    logging.info('Restored checkpoint of step %d from %s', step, self.directory)
    return state, data

  def restore_latest(self, abstract_state: Any, read_only: bool = False
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data) of the newest checkpoint that restores; None if there is none.

    A damaged checkpoint (see `is_damage`) is reported and, once an older one has restored,
    moved to `<workdir>/checkpoints.unusable/` (never with `read_only`); `self.skipped` lists
    (step, why) of those passed over. Raises UnusableCheckpointError (moving nothing) if no
    checkpoint can be read, CheckpointReadError (moving nothing) for a failure that is not
    damage, CheckpointMismatchError for another model or state.
    """
    self.skipped = []
    for step in reversed(self.all_steps()):
      state, data, error = self._try_restore(step, abstract_state)
      outcome = 0 if error is None else 1 if is_damage(error) else 2
      agreed = _worst_outcome(outcome)
      if agreed == 2:
        raise self._read_error(step, error)
      if agreed == 0:
        self._after_fallback(step, read_only)
        return step, state, data
      why = _describe(error) if error is not None else 'damaged on another process'
      self.skipped.append((step, why))
      # A reader says it in one line when done (`chosen`).
      logging.log(logging.INFO if read_only else logging.WARNING,
                  'The checkpoint of step %d in %s is damaged (%s); trying the previous one.',
                  step, self.directory, why)
    if self.skipped:
      listed = '; '.join(f'step {s}: {why}' for s, why in self.skipped)
      raise UnusableCheckpointError(
          f'None of the checkpoints in {self.directory} can be read ({listed}). Move the '
          'directory away to start from scratch, or restore it from a backup.')
    return None

  def _try_restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, Exception | None]:
    """(state, data, None), or (None, None, the error) for any failure but a mismatch."""
    try:
      return (*self.restore(step, abstract_state), None)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      return None, None, e

  def _after_fallback(self, step: int, read_only: bool) -> None:
    """Moves the damaged checkpoints passed over aside and says so (readers: neither)."""
    if not self.skipped or read_only:
      return
    for bad, _ in self.skipped:
      self._set_aside(bad)
    logging.warning('Resuming from step %d instead of %d; the damaged checkpoints were moved '
                    'to %s.', step, self.skipped[0][0], self._unusable_dir)

  def chosen(self, step: int) -> str:
    """One line for readers: which checkpoint `restore_latest` used, and which it passed over."""
    line = f'Using the checkpoint of step {step} in {self.directory}'
    if self.skipped:
      over = '; '.join(f'step {s}: {why}' for s, why in self.skipped)
      line += f', the newest that verifies (passed over, and left in place: {over})'
    return line + '.'

  def _read_error(self, step: int, error: Exception | None) -> CheckpointReadError:
    cause = _describe(error) if error is not None else 'it failed on another process'
    return CheckpointReadError(
        f'Could not read the checkpoint of step {step} in {self.directory}: {cause}. This is '
        'no evidence of damage, so nothing was moved; fix the cause (permissions, storage, '
        'host memory) and run the same command again.')

  @property
  def _unusable_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), UNUSABLE_DIR)

  def _set_aside(self, step: int) -> None:
    """Moves step `step` out of the manager's directory (process 0; then all reload)."""
    if jax.process_index() == 0:
      os.makedirs(self._unusable_dir, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)),
                os.path.join(self._unusable_dir, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}'))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vlm_jax:set_aside:{step}')
    self._manager.reload()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, as orbax restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
