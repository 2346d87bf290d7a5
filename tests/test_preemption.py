"""SIGTERM (a preemption notice) at every phase of a run ends it cleanly, leaving a workdir
the same command resumes: during the dataset build and set-up (nothing to save: the run
returns at once and tfds removes the half-built dataset), during compilation and the first
step (a checkpoint of step 1), and while an asynchronous save is in flight (it completes,
then a checkpoint of the next step). The command line exits 0 in each case."""
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import datasets
from vlm_jax.data import image_convert
from vlm_jax.training import checkpointing
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _sigterm() -> None:
  os.kill(os.getpid(), signal.SIGTERM)


def _config(data_dir, **train):
  config = tiny_config(data_dir, **train)
  config.checkpoint.every_steps = 1
  return config


def _steps(workdir, config) -> list[int]:
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  steps = checkpointer.all_steps()
  checkpointer.close()
  return steps


def _folder(path, images=8) -> str:
  path.mkdir()
  lines = []
  for i in range(images):
    Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(path / f'{i}.png')
    lines.append(f'{i}.png,a shade number {i}')
  (path / 'captions.csv').write_text('image,caption\n' + '\n'.join(lines) + '\n')
  return str(path)


def test_during_the_dataset_build_nothing_is_left_half_built(tmp_path, monkeypatch, caplog):
  config = tiny_config(tmp_path / 'tfds', 'clip_folder')
  config.data.path = _folder(tmp_path / 'images')
  decode = image_convert.decode

  def decode_then_sigterm(*args, **kwargs):  # runs in the build's worker threads
    _sigterm()
    return decode(*args, **kwargs)
  monkeypatch.setattr(image_convert, 'decode', decode_then_sigterm)
  with caplog.at_level(logging.WARNING):
    assert trainer.train_and_evaluate(config, str(tmp_path / 'run')) == (None, {})
  assert 'Preempted (SIGTERM) before the first step: nothing to save' in caplog.text
  monkeypatch.undo()
  assert not any('incomplete' in name for _, dirs, _ in os.walk(tmp_path / 'tfds')
                 for name in dirs)
  datasets.ensure_built(config.data)  # what the resumed run does first


@pytest.mark.parametrize('when', ['compilation', 'first step'])
def test_during_the_first_step_a_checkpoint_of_step_1_is_saved(shapes_small_dir, tmp_path,
                                                               monkeypatch, when):
  config = _config(shapes_small_dir, num_steps=4)
  config.checkpoint.every_steps = 0  # no periodic saves (was a ZeroDivisionError): only this
  step = trainer.Setup.step

  def step_with_sigterm(self, *args):
    if when == 'compilation':  # the first call compiles
      _sigterm()
    out = step(self, *args)
    if when == 'first step':
      _sigterm()
    return out
  monkeypatch.setattr(trainer.Setup, 'step', step_with_sigterm)
  state, results = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1 and results == {}
  assert _steps(tmp_path, config) == [1]


def test_during_an_asynchronous_save_it_completes_and_the_next_step_is_saved(
    shapes_small_dir, tmp_path, monkeypatch):
  config = _config(shapes_small_dir, num_steps=4)
  assert config.checkpoint.async_save
  save = checkpointing.Checkpointer.save

  def save_then_sigterm(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == 1:
      _sigterm()  # while step 1 is written in the background
    return saved
  monkeypatch.setattr(checkpointing.Checkpointer, 'save', save_then_sigterm)
  state, _ = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and _steps(tmp_path, config) == [1, 2]
  for step in (1, 2):
    assert checkpointing.verify_integrity(str(tmp_path / 'checkpoints' / str(step)))


HOOK = '''
import os, signal, sys
from vlm_jax.data import datasets
ensure_built = datasets.ensure_built
def preempted_build(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  return ensure_built(*args, **kwargs)
datasets.ensure_built = preempted_build
from vlm_jax import cli, train
cli.run(train.main)
'''


def test_the_command_line_exits_0(shapes_small_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', HOOK, '--config=configs/clip_shapes.py:tiny',
       f'--workdir={tmp_path}', f'--config.data.data_dir={shapes_small_dir}'], cwd=REPO,
      env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Preempted (SIGTERM) before the first step' in result.stderr
