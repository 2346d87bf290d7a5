"""Orbax checkpoints of the train state, the input pipeline's state and the model config.

Each step is one orbax checkpoint with three items: `state` (params, optimizer state, step,
non-finite counts), `data` (JSON: the grain iterator state, whether an evaluation is pending,
and a fingerprint of `state`) and `meta` (the model config, JSON).

What survives what:
- A killed save: orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when
  complete, so the previous checkpoints stay the latest complete ones; the next training run
  (`training=True`) removes the leftover.
- A damaged checkpoint (missing or truncated files, bytes that no longer match the
  fingerprint): `restore_latest` warns, moves it to `<workdir>/checkpoints.unusable/` and
  falls back to the previous one; if none is readable it raises UnusableCheckpointError and
  moves nothing.
- A failed write (full disk, unwritable directory): CheckpointWriteError naming the directory,
  the step and the cause; the earlier checkpoints are intact.
- A checkpoint of another model config, or a state of another structure (e.g. another
  optimizer): CheckpointMismatchError, never a fall-back.
"""
import contextlib
import logging
import os
import time
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


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of another model config."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, unwritable directory, ...)."""


class UnusableCheckpointError(OSError):
  """The workdir holds checkpoints, but none of them can be read."""


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """What must match for a checkpoint to be restored into a model built from `config`."""
  return {'model': config.model.to_dict()}


def _key_paths(tree: Any) -> set[str]:
  """'a/b/0'-style paths of a tree's leaves (attribute, dict and sequence keys alike)."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(name(k) for k in path) for path, _ in flat}


def _all_processes_agree(ok: bool) -> bool:
  """True if `ok` on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


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
    """Waits for an asynchronous save; raises CheckpointWriteError if it failed."""
    step, self._in_flight = self._in_flight, None
    with self._write_errors(step):
      self._manager.wait_until_finished()

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
    TrainState of ShapeDtypeStructs) and checks its fingerprint; returns (state, data)."""
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
      raise ValueError('its arrays do not match the fingerprint recorded when it was saved '
                       '(the files were altered after saving)')
    if not has_health:  # written before non-finite steps were counted
      health = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), nonfinite.init(),
                            abstract_state.health)
      state = type(abstract_state)(**state, health=health)
    logging.info('Restored checkpoint of step %d from %s', step, self.directory)
    return state, data

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data) of the newest checkpoint that restores; None if there is none.

    A checkpoint that cannot be read is reported, and once an older one has restored, moved
    to `<workdir>/checkpoints.unusable/`. Raises UnusableCheckpointError (moving nothing)
    if no checkpoint can be read, CheckpointMismatchError for another model or state.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state, data = self.restore(step, abstract_state)
        ok = True
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        ok = False
        failures.append((step, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'))
        logging.warning('The checkpoint of step %d in %s cannot be read (%s); trying the '
                        'previous one.', step, self.directory, failures[-1][1])
      if _all_processes_agree(ok):
        for bad, _ in failures:
          self._set_aside(bad)
        if failures:
          logging.warning('Resuming from step %d instead of %d; the unreadable checkpoints '
                          'were moved to %s.', step, failures[0][0], self._unusable_dir)
        return step, state, data
    if failures:
      listed = '; '.join(f'step {s}: {why}' for s, why in failures)
      raise UnusableCheckpointError(
          f'None of the checkpoints in {self.directory} can be read ({listed}). Move the '
          'directory away to start from scratch, or restore it from a backup.')
    return None

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
