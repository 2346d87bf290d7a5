"""Datasets by config: builders, building on first use, tokenizers, random-access sources.

Every function takes the `data` group of a config (see `vlm_jax.defaults`): `name`,
`builder_config`, `data_dir` ('' = tensorflow-datasets' default) and `tokenizer` ('' = the
dataset's own `tokenizer.json`, trained on its train texts when the dataset is built).
`image_text_folder` (your own data, `vlm_jax.data.image_text_folder`) takes `path` and its
build settings instead of `builder_config`.
"""
import logging
import os
import tempfile
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data import array_records
from vlm_jax.data import image_text_folder
from vlm_jax.data import records
from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tokenizer_lib

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {'shapes': shapes.Shapes}
TOKENIZER_FILE = 'tokenizer.json'


def get_builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The (not necessarily built) tfds builder of `data_cfg.name` / `data_cfg.builder_config`."""
  if data_cfg.name == image_text_folder.NAME:
    return image_text_folder.make_builder(data_cfg)
  if data_cfg.name not in BUILDERS:
    raise ValueError(f'Unknown dataset {data_cfg.name!r} (data.name); accepted: '
                     f'{sorted(BUILDERS)} or {image_text_folder.NAME!r} (with data.path).')
  cls = BUILDERS[data_cfg.name]
  configs = cls.builder_configs
  if data_cfg.builder_config not in configs:
    raise ValueError(f'Unknown builder config {data_cfg.builder_config!r} for dataset '
                     f'{data_cfg.name!r} (data.builder_config); accepted: {sorted(configs)}.')
  return cls(config=data_cfg.builder_config, data_dir=data_cfg.data_dir or None)


def _check_writable(directory: str) -> None:
  """Raises OSError unless `directory` exists and is writable, or could be created."""
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  hint = ('Set --config.data.data_dir to a writable directory (or to one where the dataset '
          'is already built).')
  if not os.path.isdir(existing):
    raise OSError(f'Data directory {directory!r} cannot be created: {existing!r} is not a '
                  f'directory. {hint}')
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise OSError(f'Data directory {directory!r} is not writable ({existing!r}: '
                  f'{e.strerror or e}); the dataset must be built there on first use. '
                  f'{hint}') from None


def _train_texts(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Captions, questions and answers of the train split, and the class names."""
  source = builder.as_data_source(
      'train', deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  texts: list[str] = []
  for start in range(0, len(source), 1024):
    for record in source.__getitems__(range(start, min(start + 1024, len(source)))):
      features = records.parse(record)
      for key in ('captions', 'questions', 'answers'):
        if key in features:  # image_text_folder has captions only
          texts.extend(records.texts(features, key))
  return texts + list(builder.info.features['label'].names)


def ensure_built(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetInfo:
  """Builds the dataset and its tokenizer unless already there; returns the dataset info.

  Raises:
    OSError: if the dataset must be built and its data directory is not writable.
  """
  builder = get_builder(data_cfg)
  tokenizer_file = os.path.join(builder.data_dir, TOKENIZER_FILE)
  if builder.is_prepared() and os.path.isfile(tokenizer_file):
    return builder.info
  _check_writable(os.fspath(builder.data_dir_root))
  if not builder.is_prepared():
    builder.download_and_prepare()
  tokenizer_lib.train_tokenizer(_train_texts(builder), tokenizer_file + '.tmp')
  os.replace(tokenizer_file + '.tmp', tokenizer_file)  # atomic: never a half-written file
  return builder.info


def built_source(data_cfg: ml_collections.ConfigDict, split: str, *,
                 raw: bool = False) -> Sequence[Any]:
  """`data_source` of `split` after `ensure_built` (which builds the dataset on first use)."""
  ensure_built(data_cfg)
  return data_source(data_cfg, split, raw=raw)


def tokenizer_path(data_cfg: ml_collections.ConfigDict) -> str:
  """`data_cfg.tokenizer` if set, else the dataset's own tokenizer.json."""
  if data_cfg.tokenizer:
    return data_cfg.tokenizer
  return os.path.join(get_builder(data_cfg).data_dir, TOKENIZER_FILE)


def load_tokenizer(data_cfg: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  """The tokenizer of `data_cfg` (run `ensure_built` first for the dataset's own)."""
  return tokenizer_lib.Tokenizer.from_file(tokenizer_path(data_cfg))


def tokenizer_if_built(data_cfg: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer | None:
  """The dataset's tokenizer if the dataset and its tokenizer are already built, else None
  (builds nothing; benchmarks then use a stand-in vocabulary)."""
  try:
    if get_builder(data_cfg).is_prepared() and os.path.isfile(tokenizer_path(data_cfg)):
      return load_tokenizer(data_cfg)
  except (OSError, ValueError) as e:
    logging.warning('Could not load the tokenizer: %s', e)
  return None


def class_names(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """Names of the classes, in label order."""
  return list(get_builder(data_cfg).info.features['label'].names)


def split_names(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """The splits of the built dataset."""
  return list(get_builder(data_cfg).info.splits.keys())


def data_source(data_cfg: ml_collections.ConfigDict, split: str, *,
                raw: bool = False) -> Sequence[Any]:
  """Random-access source of a built split: `len(source)`, `source[i]`.

  Args:
    data_cfg: the `data` config group.
    split: a split name ('train', ...) or a tfds slice of one ('train[:100]').
    raw: if True, elements are the serialised records (bytes; read fields with
      `vlm_jax.data.records`), from an `array_records.ArrayRecordSource` for ArrayRecord
      builds; otherwise dicts of numpy values, with images uint8 [S, S, 3] and text fields
      as bytes.
  """
  builder = get_builder(data_cfg)
  if not builder.is_prepared():
    raise ValueError(f'Dataset {data_cfg.name}/{data_cfg.builder_config} is not built in '
                     f'{os.fspath(builder.data_dir_root)!r}; call datasets.ensure_built first.')
  splits = list(builder.info.splits.keys())
  if split.split('[')[0] not in splits:  # 'train[:100]' style slices are fine
    raise ValueError(f'Unknown split {split!r} of {data_cfg.name}/{data_cfg.builder_config}; '
                     f'accepted: {splits}.')
  if raw and builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return array_records.ArrayRecordSource(builder.info.splits[split].file_instructions)
  if raw:
    return builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return builder.as_data_source(split)


def raw_image_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
  """(S, S, 3) when the build's records hold images as raw uint8 pixels (a tfds `Tensor`
  feature: read them with `records.raw_images`), None when as PNG or JPEG files (an
  `Image` feature: `records.decode_images`)."""
  feature = get_builder(data_cfg).info.features['image']
  if isinstance(feature, tfds.features.Tensor):
    if feature.np_dtype != np.uint8 or len(feature.shape) != 3:
      raise ValueError(f'{data_cfg.name}/{data_cfg.builder_config} stores images as '
                       f'{feature.np_dtype} {feature.shape}; raw images must be uint8 '
                       f'[S, S, 3].')
    return tuple(feature.shape)
  return None


def image_size(data_cfg: ml_collections.ConfigDict) -> int:
  """Side of the dataset's images; raises if `data_cfg.image_size` disagrees."""
  shape = get_builder(data_cfg).info.features['image'].shape
  if data_cfg.image_size != shape[0]:
    raise ValueError(f'data.image_size={data_cfg.image_size} but {data_cfg.name}/'
                     f'{data_cfg.builder_config} has {shape[0]}x{shape[1]} images; set '
                     f'--config.data.image_size={shape[0]} or pick another builder_config.')
  return shape[0]
