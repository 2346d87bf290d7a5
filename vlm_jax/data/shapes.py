"""The `shapes` dataset: procedurally drawn scenes with captions, labels and questions.

No download: every example is drawn from a generator seeded by (version, split, index), so a
build is deterministic and its examples can be drawn in any order. The scene of an index does
not depend on the resolution, so '32px' and '64px' show the same scenes, and '32px_small'
and '32px_medium' hold prefixes of '32px's examples.

Splits `train`, `validation` and `test` only contain seen (colour, shape) pairs; in
`test_novel` the first object (the one the label names) is one of the HELD_OUT_PAIRS, which
appear nowhere else, so zero-shot accuracy there measures compositional generalisation.
"""
import dataclasses
import io
import zlib
from typing import Any, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vlm_jax.data import shapes_scene
from vlm_jax.data import shapes_text
from vlm_jax.data.shapes_scene import CLASS_NAMES, COLORS, HELD_OUT_PAIRS, SEEN_PAIRS, SHAPES
from vlm_jax.data.shapes_text import flip_caption

__all__ = ['CLASS_NAMES', 'COLORS', 'HELD_OUT_PAIRS', 'SEEN_PAIRS', 'SHAPES', 'Shapes',
           'ShapesConfig', 'draw_example', 'flip_caption', 'SPLITS']

SPLITS = ('train', 'validation', 'test', 'test_novel')
_VERSION_SEED = 1  # bump with a new VERSION whose scenes differ


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Resolution and split sizes of one `shapes` variant."""
  image_size: int = 32
  num_train: int = 50_000
  num_validation: int = 1000
  num_test: int = 2000
  num_test_novel: int = 1000
  # How records store images: 'raw' (uint8 pixels: nothing to decode, and noisy scenes
  # compress no better as PNG), 'png' (exact) or 'jpeg' (smaller files for large images).
  encoding: str = 'raw'

  def num_examples(self, split: str) -> int:
    return getattr(self, f'num_{split}')


def scene_rng(split: str, index: int) -> np.random.Generator:
  """The generator that draws example `index` of `split` (independent of everything else)."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; accepted: {SPLITS}.')
  return np.random.default_rng([_VERSION_SEED, zlib.crc32(split.encode()), index])


def draw_example(split: str, index: int, image_size: int) -> dict[str, Any]:
  """Example `index` of `split`, with the image as uint8 [S, S, 3] (not yet encoded)."""
  rng = scene_rng(split, index)
  scene = shapes_scene.sample_scene(rng, novel=split == 'test_novel')
  captions = shapes_text.captions(scene, rng)  # text before pixels: same at every size
  questions, answers = shapes_text.questions_answers(scene, rng)
  image = shapes_scene.render(scene, image_size, rng)
  first = scene.objects[0]
  return {
      'image': image,
      'captions': captions,
      'label': CLASS_NAMES.index(first.name),
      'num_objects': np.int32(len(scene.objects)),
      'objects': [{'shape': o.shape, 'color': o.color, 'size': o.size,
                   'x': np.float32(o.x), 'y': np.float32(o.y)} for o in scene.objects],
      'questions': questions,
      'answers': answers,
      'hard_negative': shapes_text.hard_negative(scene),
  }


def _encode(image: np.ndarray, encoding: str) -> bytes:
  buffer = io.BytesIO()
  if encoding == 'png':
    Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
  else:
    Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes of coloured shapes (see the module docstring)."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '2.0.0': 'Same scenes; 32px, 64px and 32px_small store raw uint8 pixels instead of '
               'PNG files (the train pipeline reads them without decoding).',
  }
  BUILDER_CONFIGS = [
      ShapesConfig(name='32px', image_size=32, description='32x32 scenes.'),
      ShapesConfig(name='64px', image_size=64, description='64x64 scenes.'),
      ShapesConfig(name='224px', image_size=224, num_train=10_000, encoding='jpeg',
                   description='224x224 scenes (JPEG, fewer training examples).'),
      ShapesConfig(name='32px_small', image_size=32, num_train=512, num_validation=128,
                   num_test=128, num_test_novel=128, description='Tiny, for tests.'),
      ShapesConfig(name='32px_medium', image_size=32, num_train=4096, num_validation=128,
                   num_test=512, num_test_novel=128,
                   description='Small, for tests that train a model to a measured accuracy.'),
  ]
  DEFAULT_CONFIG_NAME = '32px'

  def __init__(self, **kwargs: Any):
    kwargs.setdefault('file_format', 'array_record')  # random access for grain
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    shape = (config.image_size, config.image_size, 3)
    if config.encoding == 'raw':  # one bytes value of S * S * 3 pixels, row-major
      image = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                   encoding=tfds.features.Encoding.BYTES)
    else:
      image = tfds.features.Image(shape=shape, dtype=np.uint8,
                                  encoding_format=config.encoding)
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': image,
            'captions': tfds.features.Sequence(text),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'num_objects': tfds.features.Scalar(dtype=np.int32),
            'objects': tfds.features.Sequence({
                'shape': text, 'color': text, 'size': text,
                'x': np.float32, 'y': np.float32}),
            'questions': tfds.features.Sequence(text),
            'answers': tfds.features.Sequence(text),
            'hard_negative': text,
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    for index in range(config.num_examples(split)):
      example = draw_example(split, index, config.image_size)
      if config.encoding != 'raw':  # tfds stores raw pixels itself
        example['image'] = _encode(example['image'], config.encoding)
      yield index, example
