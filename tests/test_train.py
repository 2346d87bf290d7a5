"""End to end on the `tiny` variant: train, checkpoint, resume bit-identically, evaluate."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlm_jax.training import checkpointing
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def uninterrupted(shapes_small_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  state, results = trainer.train_and_evaluate(tiny_config(shapes_small_dir), str(workdir))
  return workdir, jax.device_get(state.params), results


def test_run_writes_the_workdir_contract(uninterrupted):
  workdir, _, results = uninterrupted
  assert {'config.json', 'metrics.jsonl', 'results.json', 'checkpoints'} <= set(os.listdir(workdir))
  assert any(name.startswith('events') for name in os.listdir(workdir / 'tensorboard'))
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert all('step' in row for row in rows)
  train_rows = [row for row in rows if 'train/loss' in row]
  assert [row['step'] for row in train_rows] == [2, 4, 6]
  for key in ('train/learning_rate', 'train/examples_per_sec', 'train/softmax'):
    assert key in train_rows[0]
  saved = json.load(open(workdir / 'results.json'))
  assert saved == pytest.approx(results)
  for split in ('test', 'test_novel'):
    for metric in ('zeroshot_top1', 'i2t_recall@1', 't2i_recall@5', 'i2t_recall@10'):
      assert 0.0 <= saved[f'eval/{split}/{metric}'] <= 1.0
  assert json.load(open(workdir / 'config.json'))['model']['text']['vocab_size'] > 0


def test_resume_is_bit_identical(uninterrupted, shapes_small_dir, tmp_path, caplog):
  _, expected, _ = uninterrupted
  state, results = trainer.train_and_evaluate(
      tiny_config(shapes_small_dir, max_steps_per_run=3), str(tmp_path))
  assert int(state.step) == 3 and results == {}
  assert not os.path.exists(tmp_path / 'results.json')
  with caplog.at_level(logging.INFO):
    state, results = trainer.train_and_evaluate(
        tiny_config(shapes_small_dir, max_steps_per_run=3), str(tmp_path))
  assert 'Resuming from checkpoint at step 3' in caplog.text
  assert int(state.step) == 6 and results
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)


def test_checkpoint_of_another_model_is_refused(uninterrupted, shapes_small_dir):
  workdir, _, _ = uninterrupted
  config = tiny_config(shapes_small_dir)
  config.model.image.width = 64
  with pytest.raises(checkpointing.CheckpointMismatchError, match='model.image.width: 32 vs 64'):
    trainer.train_and_evaluate(config, str(workdir))


def test_siglip_trains(shapes_small_dir, tmp_path):
  state, results = trainer.train_and_evaluate(
      tiny_config(shapes_small_dir, 'siglip_shapes', num_steps=2), str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert 'train/sigmoid' in rows[0] and np.isfinite(rows[0]['train/loss'])
  assert 'eval/test_novel/zeroshot_top1' in results


@pytest.mark.slow
def test_command_line_train_then_evaluate(shapes_small_dir, tmp_path):
  common = ['--config=configs/clip_shapes.py:tiny', f'--workdir={tmp_path}',
            f'--config.data.data_dir={shapes_small_dir}']
  env = dict(os.environ, XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-m', 'vlm_jax.train', *common,
                           '--config.train.num_steps=2'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'parameters' in result.stderr
  result = subprocess.run([sys.executable, '-m', 'vlm_jax.evaluate', *common,
                           '--config.train.num_steps=2'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval/test_novel/zeroshot_top1' in result.stdout
  bad = subprocess.run([sys.executable, '-m', 'vlm_jax.train', *common,
                        '--config.model.text.width=64'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'another model config' in bad.stderr
  assert 'Traceback' not in bad.stderr
