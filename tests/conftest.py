"""Shared fixtures. XLA_FLAGS must be set before anything imports jax."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL_BUILDER_CONFIG = '32px_small'


def small_data_config(data_dir: str) -> ml_collections.ConfigDict:
  """The default `data` group pointed at the tiny shapes build in `data_dir`."""
  cfg = defaults.base_config().data
  cfg.builder_config = SMALL_BUILDER_CONFIG
  cfg.data_dir = str(data_dir)
  cfg.image_size = 32
  return cfg


@pytest.fixture(scope='session')
def shapes_small_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding shapes/32px_small and its tokenizer, built once per session."""
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.ensure_built(small_data_config(data_dir))
  return data_dir


@pytest.fixture(scope='session')
def shapes_small_cfg(shapes_small_dir) -> ml_collections.ConfigDict:
  """The `data` config of the session's 32px_small build; do not modify (shared)."""
  return small_data_config(shapes_small_dir)


@pytest.fixture
def small_data_cfg(shapes_small_dir) -> ml_collections.ConfigDict:
  """A fresh `data` config (safe to modify) for the session's 32px_small build."""
  return small_data_config(shapes_small_dir)
