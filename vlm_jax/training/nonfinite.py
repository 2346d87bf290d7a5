"""Non-finite losses and gradients (`train.nonfinite`): a guard in the step, a check on the host.

Inside the jitted step, the loss and the global gradient norm decide (`is_finite_step`)
whether the update is applied (a `lax.cond`): a step whose loss or any gradient is NaN or
Inf leaves the parameters and the optimizer state (its step count included) exactly as they
were, and is counted in `Health`. The step number still advances and its batch is consumed.
Because the optimizer's count does not advance on a skipped step, the learning-rate schedule
then runs behind the step number by the number of skipped steps; the logged learning rate is
the one the update used, `schedule(step - skipped)`.

The host reads `Health` when it logs and before it saves a checkpoint (no extra device sync
per step) and reacts by mode:
  'skip': keeps training, warns with the steps skipped so far (`train/skipped_steps` in the
    metrics); stops only after `train.max_consecutive_skips` non-finite steps in a row
    (0 = never), which is a diverged run rather than a bad batch.
  'stop': stops at the first check after a non-finite step, naming that step (not the step
    of the check). Checkpoints are checked before they are written, so the last one on disk
    is from before it.
Both stop with FloatingPointError; the entry point turns it into a one-line error.
"""
import logging

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

MODES = ('skip', 'stop')


@flax.struct.dataclass
class Health:
  """Counters carried in the TrainState (int32 scalars)."""
  skipped: jax.Array  # steps whose update was not applied, over the whole run
  streak: jax.Array   # non-finite steps in a row, up to the latest step
  first: jax.Array    # the first non-finite step since this process resumed (1-based); 0 = none


def init() -> Health:
  zero = jnp.zeros((), jnp.int32)
  return Health(skipped=zero, streak=zero, first=zero)


def is_finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """bool []: whether a step's loss and gradients are finite, from the global gradient norm
  the step computes anyway: it is NaN or Inf exactly when some gradient is (or when their
  squares overflow float32, a step no better). One test instead of one per leaf."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def update(health: Health, finite: jax.Array, step: jax.Array) -> Health:
  """`health` after step number `step` (1-based) was finite or not."""
  bad = jnp.logical_not(finite).astype(jnp.int32)
  return Health(skipped=health.skipped + bad,
                streak=(health.streak + 1) * bad,
                first=jnp.where((health.first == 0) & (bad == 1), step, health.first))


def resumed(health: Health) -> Health:
  """`health` of a restored state: `first` counts from the resumed step on."""
  zero = jax.device_put(np.zeros((), np.int32), health.first.sharding)
  return health.replace(first=zero)


def check_config(train: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a bad `train.nonfinite` or `train.max_consecutive_skips`."""
  if train.nonfinite not in MODES:
    raise ValueError(f'Unknown train.nonfinite {train.nonfinite!r}; accepted: {MODES}.')
  if train.max_consecutive_skips < 0:
    raise ValueError(f'train.max_consecutive_skips={train.max_consecutive_skips} must be >= 0 '
                     '(0 = never stop).')


class Monitor:
  """The host's reaction to `Health` (see the module doc); call `check` at log and save steps."""

  def __init__(self, train: ml_collections.ConfigDict, checkpoint_dir: str, health: Health):
    check_config(train)
    self.mode, self.max_streak = train.nonfinite, train.max_consecutive_skips
    self.checkpoint_dir = checkpoint_dir
    self._reported = int(jax.device_get(health.skipped))  # skipped steps at the last check

  def check(self, health: Health, step: int, last_checkpoint: int | None) -> None:
    """Raises FloatingPointError if the run must stop at `step`; warns of new skipped steps."""
    skipped, streak, first = (int(x) for x in jax.device_get(
        (health.skipped, health.streak, health.first)))
    if last_checkpoint is None:
      kept = f'no checkpoint was written to {self.checkpoint_dir}'
    else:
      kept = f'the last checkpoint in {self.checkpoint_dir} (step {last_checkpoint}) is kept'
    if self.mode == 'stop' and first:
      raise FloatingPointError(
          f'Non-finite loss or gradients at step {first} (train.nonfinite=\'stop\'; checked at '
          f'step {step}); {kept}. Lower optim.learning_rate, set optim.grad_clip_norm, or set '
          'train.nonfinite=\'skip\' to skip such steps.')
    if self.mode == 'skip' and self.max_streak and streak >= self.max_streak:
      raise FloatingPointError(
          f'Non-finite loss or gradients at every step from {step - streak + 1} to {step} '
          f'({streak} in a row, train.max_consecutive_skips={self.max_streak}); the run has '
          f'diverged; {kept}. Lower optim.learning_rate or set optim.grad_clip_norm.')
    if skipped > self._reported:
      logging.warning('Skipped %d step(s) with non-finite loss or gradients by step %d (%d in '
                      'all, train/skipped_steps); first since this start at step %d.',
                      skipped - self._reported, step, skipped, first)
    self._reported = skipped

