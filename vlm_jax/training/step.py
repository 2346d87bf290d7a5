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

  `metrics['grad_norm']` is the global norm of the gradients before clipping; the loss
  functions of `objectives` stop the gradient at frozen parameters, so it covers the
  trainable ones only.

  A step whose loss or gradients are not all finite leaves params and opt_state unchanged
  and is counted in `state.health` (`nonfinite`); metrics then hold the non-finite loss.
  """
  if grad_fn is None:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(rules):
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = nonfinite.is_finite_step(loss, grad_norm)

    def apply_update():
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # A cond, not a select per leaf: the update runs only when it is kept, and the step
    # has one branch instead of hundreds of small select loops (one per leaf of the state).
    params, opt_state = jax.lax.cond(finite, apply_update,
                                     lambda: (state.params, state.opt_state))
    health = nonfinite.update(state.health, finite, state.step + 1)
    metrics = {'loss': loss, **aux, 'grad_norm': grad_norm,
               # the optimizer's count, which skipped steps did not advance
               'learning_rate': schedule(state.step - state.health.skipped),
               'skipped_steps': health.skipped}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      health=health), metrics

  return step
