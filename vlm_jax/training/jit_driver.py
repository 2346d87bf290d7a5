"""The `jax.jit` driver (`parallel.mode='jit'`): one global train step partitioned by XLA.

The step sees the global batch and the whole TrainState; their shardings (batch over the
'batch' rule's mesh axes, parameters and optimizer state by `parallel.rules`) make XLA
insert the collectives: gradient reduction over the batch axes, FSDP all-gathers and
reduce-scatters over 'fsdp', tensor-parallel reductions over 'tensor'.
"""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.training import accumulation
from vlm_jax.training import objectives
from vlm_jax.training import partitioning
from vlm_jax.training import step as step_lib
from vlm_jax.training.state import TrainState


class JitDriver:
  """`step(state, batch, rng)` on global arrays of `mesh`.

  Attributes:
    loss_fn: the objective, `(params, batch, rng) -> (loss, aux)` on the global batch.
    batch_sharding: the global batch's sharding, [B, ...] split over the batch axes.
    train_step: the jitted step (donates the state); `.lower(...)` works on it.
  """

  def __init__(self, model: nn.Module, config: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
               state_sharding: TrainState):
    self.mesh = mesh
    self.rules = partitioning.rules(config.parallel)
    self.batch_sharding = partitioning.batch_sharding(mesh, config.parallel)
    replicated = NamedSharding(mesh, P())
    self.loss_fn = objectives.make_loss_fn(model, config, mesh=mesh)
    grad_fn = accumulation.grad_fn_for(model, config, mesh=mesh,
                                       batch_sharding=self.batch_sharding)
    step = step_lib.make_train_step(self.loss_fn, tx, schedule, self.rules, grad_fn)
    self.train_step = jax.jit(step, in_shardings=(state_sharding, self.batch_sharding, replicated),
                              out_shardings=(state_sharding, replicated), donate_argnums=(0,))

  def step(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch, rng)

  def device_batch(self, host_batch: dict) -> dict:
    """This process's rows of the global batch ([B / processes, ...] each) -> global arrays."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}
