"""The `jax.pmap` driver (`parallel.mode='pmap'`): the same loss, optimizer and step as the
jit driver, run as data parallelism over the mesh's devices with explicit collectives.

Each of the n devices gets one shard of the global batch ([n, B / n, ...] arrays) and the
whole state. The loss is `objectives.make_loss_fn(..., axis_name=AXIS)`: the collective loss
of the GLOBAL batch, identical on every device. In pmap, transposes sum cotangents over the
devices, so each device's gradient of that loss is n times the contribution of its own
shard for the tower parameters, and the full gradient for parameters every device uses
alike (the temperature). `lax.pmean` over the devices gives the single-device gradient for
both (`psum` would be n times too large); tests/test_parallel.py checks that loss, gradient
norm and updated parameters equal the jit driver's.

The trainer holds, checkpoints and restores the same unreplicated TrainState as under jit:
global arrays replicated over the mesh (NamedSharding(mesh, P())). pmap takes the state with
`in_axes=None` and returns it with `out_axes=None`; neither direction copies it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.training import accumulation
from vlm_jax.training import objectives
from vlm_jax.training import step as step_lib
from vlm_jax.training.accumulation import GradFn
from vlm_jax.training.state import TrainState

AXIS = 'batch'  # the pmap axis name, given to the collective losses


def synced_grad_fn(grad_fn: GradFn, axis_name: str = AXIS) -> GradFn:
  """`grad_fn` inside pmap: a per-device dropout key, gradients averaged over `axis_name`.

  The loss and aux of `grad_fn` must already be global (the collective losses); the
  returned gradients are those of the global loss, identical on every device.
  """

  def fn(params: Any, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    (loss, aux), grads = grad_fn(params, batch, rng)
    return (loss, aux), jax.lax.pmean(grads, axis_name)

  return fn


def _mean_metrics(step: step_lib.StepFn, axis_name: str = AXIS) -> step_lib.StepFn:
  """`step` whose metrics are averaged over the devices (a no-op for global metrics; makes
  any per-device metric identical on every device, as out_axes=None assumes). Integer
  metrics (counts, identical on every device) are kept as they are: pmean would make them
  floats."""

  def mean(x):
    x = jnp.asarray(x)
    return jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x

  def fn(state: TrainState, batch: dict, rng: jax.Array):
    state, metrics = step(state, batch, rng)
    return state, jax.tree.map(mean, metrics)

  return fn


class PmapDriver:
  """`step(state, batch, rng)` by `jax.pmap` over the devices of `mesh`, in mesh order.

  Attributes:
    loss_fn: the per-device objective (local batch shard in, global loss out).
    batch_sharding: [n, B / n, ...] split over a one-axis (AXIS,) mesh of the same devices.
    train_step: the pmapped step (donates the state).
  """

  def __init__(self, model: nn.Module, config: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh):
    self.devices = list(mesh.devices.flat)
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))
    self.loss_fn = objectives.make_loss_fn(model, config, axis_name=AXIS)
    grad_fn = (accumulation.grad_fn_for(model, config, axis_name=AXIS)
               or jax.value_and_grad(self.loss_fn, has_aux=True))
    # No logical axis rules: inside pmap every array is a per-device value.
    step = step_lib.make_train_step(self.loss_fn, tx, schedule, (), synced_grad_fn(grad_fn))
    self.train_step = jax.pmap(_mean_metrics(step), AXIS, in_axes=(None, 0, None),
                               out_axes=(None, None), devices=self.devices,
                               donate_argnums=(0,))

  def step(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    """Global replicated state and [n, B / n, ...] batch -> (state, metrics) on `mesh`."""
    state, metrics = self.train_step(state, batch, rng)
    # pmap returns arrays on its own one-axis mesh; re-label them (no copy) onto `mesh`.
    return jax.device_put((state, metrics), self.replicated)

  def device_batch(self, host_batch: dict) -> dict:
    """The global batch [B, ...] (one process) -> [n, B / n, ...], one shard per device."""
    n = len(self.devices)

    def put(x):
      x = np.asarray(x)
      if x.shape[0] % n:
        raise ValueError(f'A batch of {x.shape[0]} does not split over {n} pmap devices.')
      return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self.batch_sharding)

    return {k: put(v) for k, v in host_batch.items()}
