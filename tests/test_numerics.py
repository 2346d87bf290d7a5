"""Non-finite losses and gradients (`train.nonfinite`): the step skips them, the trainer counts
them ('skip') or stops naming the first one ('stop'), with both drivers and micro-batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.training import checkpointing
from vlm_jax.training import nonfinite
from vlm_jax.training import partitioning
from vlm_jax.training import step as step_lib
from vlm_jax.training import trainer
from vlm_jax.training import writers
from vlm_jax.training.state import TrainState

from run_configs import tiny_config  # pylint: disable=g-bad-import-order
from test_accumulation import random_batch, small_config  # pylint: disable=g-bad-import-order


def assert_trees_equal(got, expected):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(expected))


def _toy_step(tx, schedule):
  """A step on params {'w': [3]} with loss sum((w * x)^2) + c, `batch = {'x', 'c'}`."""
  def loss_fn(params, batch, rng):
    del rng
    return jnp.sum((params['w'] * batch['x']) ** 2) + batch['c'], {}
  return jax.jit(step_lib.make_train_step(loss_fn, tx, schedule))


def test_a_nonfinite_step_changes_nothing_but_the_counts():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = optax.adam(schedule)
  params = {'w': jnp.asarray([1.0, -2.0, 0.5])}
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     health=nonfinite.init())
  step = _toy_step(tx, schedule)
  x, zero = jnp.asarray([0.5, 1.0, 2.0]), jnp.float32(0.0)
  # Step 1: NaN gradients. Step 2: finite gradients but an infinite loss.
  for i, batch in enumerate([{'x': x.at[1].set(jnp.nan), 'c': zero},
                             {'x': x, 'c': jnp.float32(jnp.inf)}], start=1):
    before = jax.device_get(state)
    state, metrics = step(state, batch, jax.random.key(0))
    assert_trees_equal((state.params, state.opt_state), (before.params, before.opt_state))
    assert int(state.step) == i and int(metrics['skipped_steps']) == i
    assert (int(state.health.streak), int(state.health.first)) == (i, 1)
  # Step 3 applies the update optax gives the untouched state, at the optimizer's count 0.
  updates, expected_opt = tx.update({'w': 2 * params['w'] * x ** 2}, tx.init(params), params)
  state, metrics = step(state, {'x': x, 'c': zero}, jax.random.key(0))
  np.testing.assert_allclose(state.params['w'], optax.apply_updates(params, updates)['w'],
                             rtol=1e-6)
  assert_trees_equal(state.opt_state[0].count, expected_opt[0].count)
  assert float(metrics['learning_rate']) == float(schedule(0))
  assert (int(state.health.skipped), int(state.health.streak), int(state.health.first)) == (2, 0, 1)


@pytest.mark.parametrize('mode,microbatches', [('jit', 1), ('pmap', 1), ('jit', 2), ('pmap', 2)])
def test_both_drivers_skip_with_and_without_microbatches(mode, microbatches):
  config = small_config(batch=8, microbatches=microbatches)
  config.parallel.mode = mode
  setup = trainer.Setup(config, mesh=partitioning.make_mesh(config.parallel, jax.devices()[:2]))
  state = setup.init_state(jax.random.key(0))
  bad = random_batch(8)
  bad['image'][3, 5, 5, 0] = np.nan  # one pixel of one example
  before = jax.device_get(state)
  state, metrics = setup.step(state, setup.device_batch(bad), jax.random.key(1))
  assert not np.isfinite(float(metrics['loss']))
  assert_trees_equal((state.params, state.opt_state), (before.params, before.opt_state))
  assert int(metrics['skipped_steps']) == 1 and int(state.health.first) == 1
  state, metrics = setup.step(state, setup.device_batch(random_batch(8, seed=1)),
                              jax.random.key(1))
  assert np.isfinite(float(metrics['loss'])) and int(state.health.streak) == 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state.params), before.params)
  assert all(jax.tree.leaves(changed))


NAN_STEP = 3  # the step (1-based) whose batch gets a NaN pixel


class NanAt:
  """The train iterator, with a NaN pixel in the batches of the given steps (1-based; for
  runs that start at step 0)."""

  def __init__(self, iterator, steps):
    self._iterator, self._steps, self._step = iterator, steps, 0

  def __next__(self):
    batch, self._step = next(self._iterator), self._step + 1
    if self._step in self._steps:
      batch = dict(batch, image=batch['image'].copy())
      batch['image'][0, 0, 0, 0] = np.nan
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    raise NotImplementedError('NanAt is for runs from step 0')


def inject_nan(monkeypatch, *steps):
  make = trainer.pipeline.make_train_iterator
  monkeypatch.setattr(trainer.pipeline, 'make_train_iterator',
                      lambda *args, **kwargs: NanAt(make(*args, **kwargs), steps))


@pytest.fixture
def nan_batches(monkeypatch):
  inject_nan(monkeypatch, NAN_STEP)


@pytest.mark.slow
def test_skip_counts_and_finishes(nan_batches, shapes_small_dir, tmp_path, caplog):
  config = tiny_config(shapes_small_dir, log_every_steps=1, nonfinite='skip')
  config.eval.update(splits=('test',), retrieval=False, matching=False)
  state, results = trainer.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in writers.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert [r['train/skipped_steps'] for r in rows] == [0, 0, 1, 1, 1, 1]
  assert not np.isfinite(rows[NAN_STEP - 1]['train/loss'])
  assert all(np.isfinite(r['train/loss']) for i, r in enumerate(rows) if i != NAN_STEP - 1)
  assert 'Skipped 1 step(s) with non-finite loss or gradients by step 3' in caplog.text
  assert int(state.step) == 6 and results


def test_stop_names_the_first_nonfinite_step(nan_batches, shapes_small_dir, tmp_path):
  # Logged at steps 2 and 4, checkpointed at 2 and 4: the NaN of step 3 is found at step 4.
  config = tiny_config(shapes_small_dir, log_every_steps=2, nonfinite='stop')
  config.checkpoint.every_steps = 2
  with pytest.raises(FloatingPointError, match=r'at step 3 .*checked at step 4\).*\(step 2\) '
                                               'is kept'):
    trainer.train_and_evaluate(config, str(tmp_path))
  checkpointer = checkpointing.Checkpointer(str(tmp_path), config)
  assert checkpointer.all_steps() == [2]
  checkpointer.close()


def test_skip_stops_a_diverged_run(shapes_small_dir, tmp_path, monkeypatch):
  inject_nan(monkeypatch, *range(2, 7))
  config = tiny_config(shapes_small_dir, log_every_steps=1, max_consecutive_skips=3)
  with pytest.raises(FloatingPointError, match='every step from 2 to 4 .3 in a row'):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize('key,value,match', [('nonfinite', 'ignore', 'accepted'),
                                             ('max_consecutive_skips', -1, '>= 0')])
def test_bad_settings_are_refused(key, value, match):
  config = small_config()
  config.train[key] = value
  with pytest.raises(ValueError, match=match):
    nonfinite.check_config(config.train)
