"""Faults made for real: SIGKILL (while training and while a checkpoint is written), SIGTERM,
damaged checkpoints and full disks. Every interrupted run must end bit-identical to an
uninterrupted one (parameters, optimizer state, metrics.jsonl without its wall-clock rates,
results.json), and two runs of one config and seed must write the same metrics.

The end-to-end runs are `python -m vlm_jax.train` subprocesses on one CPU device, sharing a
persistent compilation cache (except the determinism run, which compiles afresh).
"""
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.convert import workdir as workdir_lib
from vlm_jax.defaults import base_config
from vlm_jax.training import checkpointing
from vlm_jax.training import fingerprint
from vlm_jax.training import nonfinite
from vlm_jax.training import writers
from vlm_jax.training.state import TrainState

from run_configs import REPO  # pylint: disable=g-bad-import-order
from test_multihost import _clean_env, _free_port  # pylint: disable=g-bad-import-order

STEPS = 12
# A failed orbax restore leaves tensorstore callbacks for its closed event loop ("Event loop
# is closed", ignored by Python); nothing of ours.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


# Checkpointer: damaged checkpoints, failed writes, other structures.


def _state(scale: float, opt=optax.adam(1e-3)) -> TrainState:
  params = {'w': jnp.arange(1 << 16, dtype=jnp.float32) * scale, 'b': jnp.full((3,), scale)}
  return TrainState(step=jnp.int32(scale), params=params, opt_state=opt.init(params),
                    health=nonfinite.init())


def _checkpointer(tmp_path, async_save=True) -> checkpointing.Checkpointer:
  config = base_config()
  config.checkpoint.async_save = async_save
  return checkpointing.Checkpointer(str(tmp_path), config)


def _save_steps(tmp_path, steps=(1, 2)):
  checkpointer = _checkpointer(tmp_path)
  for step in steps:
    checkpointer.save(step, _state(step), {'iterator': {'next': step}})
  checkpointer.close()


def _array_files(step_dir):
  return [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
          for name in names if f'{os.sep}d{os.sep}' in os.path.join(root, name) + os.sep]


def _damage(step_dir: str, how: str) -> None:
  if how == 'truncated array file':
    for path in _array_files(step_dir):
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'flipped bit':  # only the fingerprint notices this one
    path = max(_array_files(step_dir), key=os.path.getsize)
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0x10
    open(path, 'wb').write(bytes(data))
  elif how == 'missing index':
    os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
  elif how == 'truncated data state':
    os.truncate(os.path.join(step_dir, 'data', 'metadata'), 3)
  elif how == 'missing state':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  else:
    raise ValueError(how)


DAMAGES = ('truncated array file', 'flipped bit', 'missing index', 'truncated data state',
           'missing state')


@pytest.mark.parametrize('how', DAMAGES)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, how, caplog):
  _save_steps(tmp_path)
  _damage(str(tmp_path / 'checkpoints' / '2'), how)
  checkpointer = _checkpointer(tmp_path)
  with caplog.at_level(logging.WARNING):
    step, state, data = checkpointer.restore_latest(checkpointing.abstract_like(_state(0)))
  assert step == 1 and data['iterator'] == {'next': 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(1)))
  assert 'The checkpoint of step 2' in caplog.text
  assert 'Resuming from step 1 instead of 2' in caplog.text
  assert checkpointer.all_steps() == [1]
  assert [n.split('.')[0] for n in os.listdir(tmp_path / 'checkpoints.unusable')] == ['2']
  checkpointer.save(2, _state(2), {})  # the step can be written again
  checkpointer.close()


def test_no_readable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
  _save_steps(tmp_path)
  _damage(str(tmp_path / 'checkpoints' / '2'), 'missing index')
  _damage(str(tmp_path / 'checkpoints' / '1'), 'truncated array file')
  checkpointer = _checkpointer(tmp_path)
  with pytest.raises(checkpointing.UnusableCheckpointError,
                     match=r'None of the checkpoints in .*checkpoints can be read \(step 2: .*; '
                           r'step 1: .*\)\. Move the directory away'):
    checkpointer.restore_latest(checkpointing.abstract_like(_state(0)))
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_a_state_of_another_structure_is_a_mismatch_not_damage(tmp_path):
  _save_steps(tmp_path)
  checkpointer = _checkpointer(tmp_path)
  with pytest.raises(checkpointing.CheckpointMismatchError, match='another optimizer'):
    checkpointer.restore_latest(checkpointing.abstract_like(_state(0, optax.sgd(0.1, 0.9))))
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_a_checkpoint_from_before_health_restores_with_zero_counts(tmp_path):
  checkpointer = _checkpointer(tmp_path)
  old = _state(1)
  old_tree = {'step': old.step, 'params': old.params, 'opt_state': old.opt_state}
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(old_tree), data=ocp.args.JsonSave({}),
      meta=ocp.args.JsonSave(checkpointing.model_signature(base_config())))
  checkpointer._manager.save(1, args=args)  # pylint: disable=protected-access
  checkpointer.wait()
  step, state, _ = checkpointer.restore_latest(checkpointing.abstract_like(_state(0)))
  assert step == 1 and int(state.health.skipped) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), old.params)
  checkpointer.close()


def _disk_full_at(monkeypatch, step):
  """Every orbax metadata write into the checkpoint of `step` fails with ENOSPC."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  write_text = async_path.write_text

  async def full(path, *args, **kwargs):
    if f'{os.sep}{step}.orbax-checkpoint-tmp' in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await write_text(path, *args, **kwargs)

  monkeypatch.setattr(async_path, 'write_text', full)


@pytest.mark.parametrize('async_save', [True, False])
def test_a_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch,
                                                                    async_save):
  checkpointer = _checkpointer(tmp_path, async_save)
  checkpointer.save(1, _state(1), {})
  _disk_full_at(monkeypatch, 2)
  with pytest.raises(checkpointing.CheckpointWriteError) as error:
    checkpointer.save(2, _state(2), {})
    checkpointer.close()
  message = str(error.value)
  assert f'Could not write the checkpoint of step 2 to {tmp_path}' in message
  assert 'No space left on device' in message and '(steps 1) are intact' in message
  monkeypatch.undo()
  # (Not saving again here: tensorstore may still be writing the failed step's arrays.)
  checkpointer = _checkpointer(tmp_path)
  step, state, _ = checkpointer.restore_latest(checkpointing.abstract_like(_state(0)))
  assert step == 1 and float(state.params['b'][0]) == 1.0
  checkpointer.close()


def test_fingerprint_sees_one_bit_and_not_the_sharding():
  tree = {'a': jnp.arange(64, dtype=jnp.float32).reshape(8, 8), 'b': jnp.arange(5),
          'c': jnp.ones((8,), jnp.bfloat16)}
  value = fingerprint.fingerprint(tree)
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(tree['a'], NamedSharding(mesh, P('x')))
  assert fingerprint.fingerprint(dict(tree, a=sharded)) == value
  bits = jax.lax.bitcast_convert_type(tree['a'], jnp.uint32)
  for index in [(0, 0), (3, 5), (7, 7)]:
    for bit in (0, 17, 31):
      flipped = jax.lax.bitcast_convert_type(bits.at[index].set(bits[index] ^ np.uint32(1 << bit)),
                                             jnp.float32)
      assert fingerprint.fingerprint(dict(tree, a=flipped)) != value
  swapped = dict(tree, a=tree['a'][::-1])  # same values, other positions
  assert fingerprint.fingerprint(swapped) != value


# metrics.jsonl after a crash.


def test_resume_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': 1, 'x': 1.0}, {'step': 2, 'x': 2.0}, {'step': 2, 'e': 0.5},
          {'step': 3, 'x': 3.0}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 4, "x"')
  writer = writers.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, {'x': 9.0})
  writer.close()
  assert writers.read_metrics(str(tmp_path)) == rows[:3] + [{'step': 3, 'x': 9.0}]


# End to end, in subprocesses.

HOOK = r'''
import errno, os, sys, time
from orbax.checkpoint._src.path import async_path
hook, step = sys.argv.pop(1), sys.argv.pop(1)
marker, write_text = f'/{step}.orbax-checkpoint-tmp/', async_path.write_text
async def patched(path, *args, **kwargs):
  if marker in str(path):
    if hook == 'hang':
      print(f'WRITING CHECKPOINT {step}', file=sys.stderr, flush=True)
      time.sleep(600)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return await write_text(path, *args, **kwargs)
async_path.write_text = patched
from vlm_jax import cli, train
cli.run(train.main)
'''


def _flags(workdir, data_dir) -> list[str]:
  return ['--config=configs/clip_shapes.py:tiny', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', f'--config.train.num_steps={STEPS}',
          '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=2',
          '--config.eval.every_steps=1', "--config.eval.splits=('test',)",
          '--config.eval.retrieval=False', '--config.eval.matching=False',
          '--config.eval.max_examples=32']


def _env(cache_dir, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS='', PYTHONUNBUFFERED='1', **extra)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


class Run:
  """One training subprocess, its stderr read line by line; `on_line(run, line)` may signal it."""

  def __init__(self, args, env, on_line=None, timeout=600):
    self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(timeout, self.proc.kill)
    watchdog.start()
    self.lines = []
    for line in self.proc.stderr:
      self.lines.append(line)
      if on_line:
        on_line(self, line)
    self.returncode = self.proc.wait()
    watchdog.cancel()

  @property
  def log(self) -> str:
    return ''.join(self.lines)

  def tail(self) -> str:
    return self.log[-4000:]

  def signal(self, sig) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)


def _train(workdir, data_dir, env, on_line=None, hook=()):
  args = ['-c', HOOK, *hook] if hook else ['-m', 'vlm_jax.train']
  return Run([*args, *_flags(workdir, data_dir)], env, on_line)


def _at_step(step, sig, total=STEPS):
  """`on_line` that sends `sig` once step `step` (of `total`) is logged."""
  def on_line(run, line):
    if re.search(rf'\bstep {step}/{total}\b', line) and not getattr(run, 'sent', False):
      run.sent = True
      run.signal(sig)
  return on_line


def _outcome(workdir) -> dict:
  """What must be identical between runs: rows without wall-clock rates, results, the final
  parameters and the fingerprint of the whole final state."""
  final = max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  with open(os.path.join(workdir, 'checkpoints', str(final), 'data', 'metadata')) as f:
    state_fingerprint = json.load(f)['fingerprint']
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return {'rows': writers.without_wall_clock(writers.read_metrics(workdir)),
          'results': results, 'final_step': final, 'fingerprint': state_fingerprint,
          'params': workdir_lib.load_params(workdir, merge_lora=False)}


def assert_same_outcome(got, expected, context=''):
  assert got['final_step'] == expected['final_step'] == STEPS, context
  assert got['rows'] == expected['rows'], context
  assert got['results'] == expected['results'], context
  assert got['fingerprint'] == expected['fingerprint'], context
  jax.tree.map(np.testing.assert_array_equal, got['params'], expected['params'])


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def reference(shapes_small_dir, tmp_path_factory, cache_dir):
  """An uninterrupted run (filling the compilation cache)."""
  workdir = tmp_path_factory.mktemp('reference')
  run = _train(workdir, shapes_small_dir, _env(cache_dir, PYTHONHASHSEED='1'))
  assert run.returncode == 0, run.tail()
  outcome = _outcome(str(workdir))
  assert len([r for r in outcome['rows'] if 'train/loss' in r]) == STEPS
  assert len([r for r in outcome['rows'] if 'eval/test/zeroshot_top1' in r]) == STEPS
  return workdir, outcome


@pytest.fixture(scope='module')
def second_run(shapes_small_dir, tmp_path_factory):
  """The same command again, in a fresh process without the compilation cache."""
  workdir = tmp_path_factory.mktemp('second')
  run = _train(workdir, shapes_small_dir, _env(None, PYTHONHASHSEED='2'))
  assert run.returncode == 0, run.tail()
  return workdir


@pytest.mark.slow
def test_two_runs_write_identical_metrics(reference, second_run):
  workdir, expected = reference
  assert_same_outcome(_outcome(str(second_run)), expected)
  rates = [r[k] for r in writers.read_metrics(str(workdir)) for k in writers.WALL_CLOCK_KEYS
           if k in r]
  assert len(rates) == 2 * STEPS  # the only values left out of the comparison


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_0(reference, shapes_small_dir, tmp_path,
                                                      cache_dir):
  env = _env(cache_dir)
  run = _train(tmp_path, shapes_small_dir, env, _at_step(5, signal.SIGTERM))
  assert run.returncode == 0, run.tail()
  match = re.search(r'Preempted \(SIGTERM\) at step (\d+): saved a checkpoint in (\S+); the '
                    r'same command resumes from step \1', run.log)
  assert match, run.tail()
  stopped = int(match.group(1))
  assert 5 <= stopped < STEPS and match.group(2) == str(tmp_path / 'checkpoints')
  assert os.path.isdir(tmp_path / 'checkpoints' / str(stopped))
  assert not os.path.exists(tmp_path / 'results.json')
  resumed = _train(tmp_path, shapes_small_dir, env)
  assert resumed.returncode == 0, resumed.tail()
  assert f'Resuming from checkpoint at step {stopped} ' in resumed.log
  assert_same_outcome(_outcome(str(tmp_path)), reference[1])


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous(reference,
                                                                     shapes_small_dir,
                                                                     tmp_path, cache_dir):
  env = _env(cache_dir)
  killer = lambda run, line: 'WRITING CHECKPOINT 6' in line and run.signal(signal.SIGKILL)
  run = _train(tmp_path, shapes_small_dir, env, killer, hook=('hang', '6'))
  assert run.returncode == -signal.SIGKILL, run.tail()
  assert '6.orbax-checkpoint-tmp' in os.listdir(tmp_path / 'checkpoints')
  resumed = _train(tmp_path, shapes_small_dir, env)
  assert resumed.returncode == 0, resumed.tail()
  assert 'Resuming from checkpoint at step 4 ' in resumed.log
  assert not any('tmp' in n for n in os.listdir(tmp_path / 'checkpoints'))
  assert_same_outcome(_outcome(str(tmp_path)), reference[1])


@pytest.mark.slow
def test_killed_three_times_at_random_steps_ends_bit_identical(reference, shapes_small_dir,
                                                              tmp_path, cache_dir):
  seed = random.randrange(1 << 30)
  rng, env, kills = random.Random(seed), _env(cache_dir), []

  def on_line(run, line):
    resumed = re.search(r'Resuming from checkpoint at step (\d+) ', line)
    if resumed or 'starting from step 0' in line:
      start = int(resumed.group(1)) if resumed else 0
      run.kill_at = rng.randint(start + 1, STEPS - 2)
      run.delay = rng.uniform(0.0, 0.2)
      kills.append((start, run.kill_at, round(run.delay, 3)))
    elif getattr(run, 'kill_at', None) and re.search(rf'\bstep {run.kill_at}/{STEPS}\b', line):
      threading.Timer(run.delay, run.signal, (signal.SIGKILL,)).start()
      run.kill_at = None

  for _ in range(3):
    run = _train(tmp_path, shapes_small_dir, env, on_line)
    context = f'seed {seed}, (start, kill step, delay) so far: {kills}'
    assert run.returncode == -signal.SIGKILL, f'{context}\n{run.tail()}'
  final = _train(tmp_path, shapes_small_dir, env)
  assert final.returncode == 0, final.tail()
  assert_same_outcome(_outcome(str(tmp_path)), reference[1], f'seed {seed}: {kills}')


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_previous(reference, second_run,
                                                              shapes_small_dir, tmp_path,
                                                              cache_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(second_run, workdir)
  _damage(str(workdir / 'checkpoints' / str(STEPS)), 'truncated array file')
  os.remove(workdir / 'results.json')
  run = _train(workdir, shapes_small_dir, _env(cache_dir))
  assert run.returncode == 0, run.tail()
  assert f'The checkpoint of step {STEPS} in {workdir / "checkpoints"} is damaged' in run.log
  assert f'Resuming from checkpoint at step {STEPS - 2} ' in run.log
  assert_same_outcome(_outcome(str(workdir)), reference[1])


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_earlier_checkpoints(shapes_small_dir,
                                                                      tmp_path, cache_dir):
  run = _train(tmp_path, shapes_small_dir, _env(cache_dir), hook=('full', '4'))
  assert run.returncode == 2, run.tail()  # handled: cli's one-line error, not a crash
  error = [line for line in run.lines if line.startswith('error: ')]
  assert len(error) == 1, run.tail()
  assert (f'Could not write the checkpoint of step 4 to {tmp_path / "checkpoints"}: No space '
          'left on device') in error[0] and '(steps 2) are intact' in error[0]
  checkpointer = _checkpointer(tmp_path)
  assert checkpointer.all_steps() == [2]
  checkpointer.close()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_both_at_one_step(shapes_small_dir, tmp_path):
  """JAX's preemption service tells the other process and agrees on the step to save at."""
  port, steps, runs = _free_port(), 30, [None, None]
  env = dict(_clean_env(), PYTHONUNBUFFERED='1')

  def process(i):
    args = ['-m', 'vlm_jax.train', *_flags(tmp_path, shapes_small_dir),
            f'--config.train.num_steps={steps}', '--config.eval.every_steps=0',
            '--config.checkpoint.every_steps=100', '--num_cpu_devices=2',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    runs[i] = Run(args, env, _at_step(3, signal.SIGTERM, total=steps) if i == 1 else None)

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  saved = set()
  for run in runs:
    assert run.returncode == 0, run.tail()
    match = re.search(r'Preempted \(a preemption notice\) at step (\d+)', run.log)
    assert match, run.tail()
    saved.add(int(match.group(1)))
  (step,) = saved
  assert 3 <= step < steps and os.listdir(tmp_path / 'checkpoints') == [str(step)]
