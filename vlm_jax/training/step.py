"""The pure train step: gradients of the objective, an optax update, step metrics."""
from typing import Callable

import flax.linen as nn
import jax
import optax

from vlm_jax.training import nonfinite
from vlm_jax.training.accumulation import GradFn
from vlm_jax.training.objectives import LossFn
from vlm_jax.training.state import TrainState

StepFn = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, rules=(), grad_fn: GradFn | None = None
                    ) -> StepFn:
  """`step(state, batch, rng) -> (state, metrics)`; `batch` is the global batch (under jit
  with shardings) and `rng` the run's dropout key, folded with the step number.

  `grad_fn(params, batch, rng) -> ((loss, aux), grads)` replaces
  `jax.value_and_grad(loss_fn, has_aux=True)` when given: e.g. the gradient caching over
  micro-batches of `accumulation.grad_fn_for` (`train.microbatches` > 1).

  A step whose loss or gradients are not all finite leaves params and opt_state unchanged
  and is counted in `state.health` (`nonfinite`); metrics then hold the non-finite loss.
  """
  if grad_fn is None:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(rules):
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = nonfinite.all_finite((loss, grads))
    params, opt_state = nonfinite.keep_if(finite, (params, opt_state),
                                          (state.params, state.opt_state))
    health = nonfinite.update(state.health, finite, state.step + 1)
    metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads),
               # the optimizer's count, which skipped steps did not advance
               'learning_rate': schedule(state.step - state.health.skipped),
               'skipped_steps': health.skipped}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      health=health), metrics

  return step
