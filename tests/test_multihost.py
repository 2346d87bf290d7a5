"""Multi-process training: 2 processes x 4 CPU devices match 1 process x 8 devices.

Also: how the multi-process settings are resolved from flags and the environment, and
evaluation with parameters on a mesh.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vlm_jax.data import datasets
from vlm_jax.eval import runner
from vlm_jax.training import checkpointing
from vlm_jax.training import distributed
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order

NUM_STEPS = 3


# Settings from flags and the environment.


def test_no_flags_and_no_cluster_is_one_process():
  assert distributed.resolve(environ={}).mode == 'none'
  assert distributed.resolve(environ={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}).mode == 'none'


def test_explicit_flags():
  settings = distributed.resolve('10.0.0.1:1234', 4, 3, environ={})
  assert settings == distributed.Settings('explicit', '10.0.0.1:1234', 4, 3)


@pytest.mark.parametrize('args,match', [(('h:1', None, None), 'go together'),
                                        (('h:1', 2, 2), 'not in'),
                                        (('host', 2, 0), 'HOST:PORT')])
def test_bad_flags_are_clear_errors(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(*args, environ={})


def test_environment_switch_and_slurm_detection():
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '2',
           'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
  assert distributed.resolve(environ=slurm).mode == 'auto'
  assert distributed.resolve(environ={**slurm, distributed.ENV_VAR: '0'}).mode == 'none'
  assert distributed.resolve(environ={distributed.ENV_VAR: '1'}).mode == 'auto'
  with pytest.raises(ValueError, match='use 1'):
    distributed.resolve(environ={distributed.ENV_VAR: 'maybe'})


def test_primary_first_runs_once_in_one_process():
  calls = []
  assert distributed.primary_first(lambda: calls.append(1) or 'done', 'x') == 'done'
  assert calls == [1]


# Evaluation with parameters on a mesh.


def test_embeddings_of_mesh_params_equal_host_params(shapes_small_dir):
  config = _tiny_config(shapes_small_dir)
  tokenizer = datasets.load_tokenizer(config.data)
  trainer.resolve_config(config, tokenizer)
  setup = trainer.Setup(config)
  state = setup.init_state(jax.random.key(1))
  images = np.random.default_rng(0).normal(size=(21, 32, 32, 3)).astype(np.float32)
  texts = ['a red circle', 'a small blue square'] * 5
  # batch_size 6 is rounded up to 8, a multiple of the 8 data-parallel devices.
  on_mesh = runner.Embedder(setup.model, state.params, tokenizer, 16, 6, config.parallel)
  on_host = runner.Embedder(setup.model, jax.device_get(state.params), tokenizer, 16, 6)
  assert on_mesh.batch_size == 8
  np.testing.assert_allclose(on_mesh.images(images), on_host.images(images), atol=1e-6)
  np.testing.assert_allclose(on_mesh.texts(texts), on_host.texts(texts), atol=1e-6)


# Two processes against one.


def _tiny_config(data_dir):
  return tiny_config(data_dir, num_steps=NUM_STEPS)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _clean_env() -> dict:
  """This environment without the 8-device XLA_FLAGS and any cluster variables."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('SLURM_') and k not in ('XLA_FLAGS', distributed.ENV_VAR)}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _train_command(workdir, data_dir, *extra) -> list[str]:
  return [sys.executable, '-m', 'vlm_jax.train', '--config=configs/clip_shapes.py:tiny',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--config.train.num_steps={NUM_STEPS}', *extra]


def _run_all(commands: list[list[str]], timeout: float = 400) -> None:
  """Runs the commands at once; on any failure or timeout kills the rest, shows the logs."""
  procs = [subprocess.Popen(c, cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in commands]
  deadline = time.monotonic() + timeout
  try:
    for proc in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  failed = [p for p in procs if p.poll() != 0]
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
  logs = [proc.communicate()[0] for proc in procs]
  if failed:
    pytest.fail('\n\n'.join(f'process {i} (rc {p.returncode}):\n{log[-3000:]}'
                            for i, (p, log) in enumerate(zip(procs, logs))))


def _two_processes(workdir, data_dir, *extra) -> None:
  port = _free_port()
  _run_all([_train_command(workdir, data_dir, '--num_cpu_devices=4',
                           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                           f'--process_id={i}', *extra) for i in range(2)])


@pytest.fixture(scope='module')
def runs(shapes_small_dir, tmp_path_factory):
  """Workdirs of one process (8 devices) and of two (4 devices each) that stopped after 2
  steps and resumed from their checkpoint; the data is built before they start."""
  single = tmp_path_factory.mktemp('single')
  multi = tmp_path_factory.mktemp('multi')
  _run_all([_train_command(single, shapes_small_dir, '--num_cpu_devices=8')])
  _two_processes(multi, shapes_small_dir, '--config.train.max_steps_per_run=2')
  assert not os.path.exists(multi / 'results.json')  # stopped at step 2
  _two_processes(multi, shapes_small_dir, '--config.train.max_steps_per_run=2')
  return single, multi


def _train_losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {row['step']: row['train/loss'] for row in rows if 'train/loss' in row}


def _restore_params(workdir, data_dir):
  config = _tiny_config(data_dir)
  trainer.resolve_config(config, datasets.load_tokenizer(config.data))
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  assert checkpointer.latest_step() == NUM_STEPS
  state, _ = checkpointer.restore(NUM_STEPS, trainer.Setup(config).abstract_state)
  checkpointer.close()
  return jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_train_like_one(runs, shapes_small_dir):
  single, multi = runs
  losses = _train_losses(single)
  assert sorted(losses) == [2, 3]
  multi_losses = _train_losses(multi)
  assert sorted(multi_losses) == [2, 3]
  np.testing.assert_allclose([multi_losses[s] for s in (2, 3)], [losses[s] for s in (2, 3)],
                             rtol=1e-5)
  expected = _restore_params(single, shapes_small_dir)
  got = _restore_params(multi, shapes_small_dir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), got, expected)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(runs):
  single, multi = runs
  expected = json.load(open(single / 'results.json'))
  got = json.load(open(multi / 'results.json'))
  assert set(got) == set(expected) and 'eval/test_novel/zeroshot_top1' in got
  assert got == pytest.approx(expected, abs=1e-6)
