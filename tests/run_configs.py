"""The configs of `configs/` at their 'tiny' variant, pointed at a test's data directory."""
import os

import ml_collections

from vlm_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, name: str = 'clip_shapes', **train) -> ml_collections.ConfigDict:
  """`configs/{name}.py:tiny` reading the shapes build in `data_dir`, with `train.*`
  overridden by the keyword arguments."""
  config = cli._load_config_file(os.path.join(REPO, 'configs', f'{name}.py:tiny'))  # pylint: disable=protected-access
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  return config
