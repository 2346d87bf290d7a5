"""Configs: every config loads, is locked, and mistakes give one-line errors."""
import os
import subprocess
import sys

import pytest

from vlm_jax import config_utils
from vlm_jax.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  from vlm_jax import cli
  return cli._load_config_file(os.path.join(REPO, 'configs', name) + (f':{arg}' if arg else ''))


@pytest.mark.parametrize('name,arg', [('clip_shapes.py', None), ('clip_shapes.py', 'tiny'),
                                      ('clip_shapes.py', 'bench'), ('siglip_shapes.py', None),
                                      ('siglip_shapes.py', 'tiny'), ('clip_vit_b16.py', None),
                                      ('clip_vit_b16.py', 'tiny')])
def test_configs_load_and_are_locked(name, arg):
  config = _load(name, arg)
  assert set(config.keys()) >= {'data', 'model', 'loss', 'optim', 'parallel', 'train', 'eval',
                                'checkpoint', 'seed'}
  with pytest.raises(AttributeError):
    config.train.num_stepz = 3


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match='accepted'):
    _load('clip_shapes.py', 'huge')


def test_nearest_key_is_named():
  config = base_config()
  with pytest.raises(ValueError, match='Did you mean "train.num_steps"'):
    config_utils.check_overrides(config, ['--config.train.num_step=5'])
  config_utils.check_overrides(config, ['--config.train.num_steps=5', '--workdir=x'])


def test_diff_names_changed_keys():
  a = {'model': {'image': {'width': 128}, 'name': 'x'}}
  b = {'model': {'image': {'width': 256}, 'name': 'x'}}
  assert config_utils.diff(a, b) == ['model.image.width: 128 vs 256']


def test_diff_counts_keys_missing_from_an_old_config_at_their_defaults():
  saved = {'model': {'image': {'width': 128}}}  # written before 'layers' existed
  defaults = {'model': {'image': {'width': 64, 'layers': (1, 1)}}}
  assert not config_utils.diff(saved, {'model': {'image': {'width': 128, 'layers': [1, 1]}}},
                               defaults)
  assert config_utils.diff(saved, {'model': {'image': {'width': 128, 'layers': [2, 2]}}},
                           defaults) == ['model.image.layers: [1, 1] vs [2, 2]']


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'vlm_jax.train', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_one_line_error(tmp_path):
  result = _run('--config=configs/clip_shapes.py:tiny', f'--workdir={tmp_path}',
                '--config.train.num_step=3')
  assert result.returncode == 2
  assert 'Did you mean "train.num_steps"' in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_missing_config_file(tmp_path):
  result = _run('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'does not exist' in result.stderr and 'Traceback' not in result.stderr


def test_cli_config_without_get_config(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('x = 1\n')
  result = _run(f'--config={bad}', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'get_config' in result.stderr and 'Traceback' not in result.stderr


def test_help_describes_flags():
  result = subprocess.run([sys.executable, '-m', 'vlm_jax.train', '--helpfull'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert '--workdir' in result.stdout and '--config' in result.stdout
