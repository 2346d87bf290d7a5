"""Fusion learns: a small ALBEF trained for 300 steps tells a one-object caption's
position words from their mirror image ('on the left' vs 'on the right') by ITM, and cannot
when the images are zeroed."""
import numpy as np
import pytest

from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.training import trainer

from run_configs import tiny_config  # pylint: disable=g-bad-import-order

MIN_POSITION_ACCURACY = 0.75  # one-object scenes of shapes/32px_medium:test; chance 0.5
MAX_BLIND_POSITION_ACCURACY = 0.65


@pytest.fixture(scope='module')
def shapes_medium_dir(tmp_path_factory) -> str:
  """A data_dir holding shapes/32px_medium (4,096 train scenes: 512 are memorised)."""
  data_dir = str(tmp_path_factory.mktemp('tfds_medium'))
  config = tiny_config(data_dir, 'albef_shapes')
  config.data.builder_config = '32px_medium'
  datasets.ensure_built(config.data)
  return data_dir


def learning_config(data_dir):
  """`albef_shapes:tiny` at width 64 and depth 2 with the grounding recipe of
  configs/fusion_shapes.py (one-object scenes naming a place, place words masked more often)
  for all its steps, ITM on the dataset's false captions only (here: mirrored places)."""
  config = tiny_config(data_dir, 'albef_shapes', num_steps=300, batch_size=64,
                       log_every_steps=100)
  config.data.builder_config = '32px_medium'
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 64, 2, 4, 128
  config.model.embed_dim = 64
  f = config.model.fusion
  f.depth, f.num_heads, f.mlp_dim = 2, 4, 128
  config.optim.warmup_steps = 30
  config.data.curriculum.steps = 300
  config.loss.itm_batch_negatives = False
  config.checkpoint.every_steps = 300
  config.eval.splits, config.eval.max_examples = ('test',), 0
  config.eval.zeroshot = config.eval.retrieval = False
  config.eval.rerank_k = 0
  return config


def _position_accuracy(config, workdir) -> float:
  _, results = trainer.train_and_evaluate(config, str(workdir))
  return results['eval/test/position_accuracy_one_object']


@pytest.mark.slow
def test_fusion_learns(shapes_medium_dir, tmp_path):
  accuracy = _position_accuracy(learning_config(shapes_medium_dir), tmp_path)
  assert accuracy >= MIN_POSITION_ACCURACY, accuracy


@pytest.mark.slow
def test_fusion_learns_nothing_from_zeroed_images(shapes_medium_dir, tmp_path, monkeypatch):
  normalize = pipeline.normalize_images
  monkeypatch.setattr(pipeline, 'normalize_images',
                      lambda images, data_cfg: np.zeros_like(normalize(images, data_cfg)))
  accuracy = _position_accuracy(learning_config(shapes_medium_dir), tmp_path)
  assert accuracy <= MAX_BLIND_POSITION_ACCURACY, accuracy
