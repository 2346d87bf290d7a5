"""Orbax checkpoints of the train state, the input pipeline's state and the model config.

Each step is one orbax checkpoint with three items: `state` (params, optimizer state, step),
`data` (the grain iterator state, JSON) and `meta` (the model config, JSON). Orbax writes to
a temporary directory and renames it when complete, so a killed save leaves the previous
checkpoints usable.
"""
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vlm_jax import config_utils
from vlm_jax import defaults


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of another model config."""


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """What must match for a checkpoint to be restored into a model built from `config`."""
  return {'model': config.model.to_dict()}


class Checkpointer:
  """Saves every `checkpoint.every_steps`, keeps `checkpoint.keep`, restores the latest."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'data', 'meta'), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(model_signature(self._config)))
    return self._manager.save(step, args=args, force=force)

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

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` into the shapes and shardings of `abstract_state`."""
    self.check_compatible(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint of step %d from %s', step, self.directory)
    return restored['state'], restored['data']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, as orbax restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
