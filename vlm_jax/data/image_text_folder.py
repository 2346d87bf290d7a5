"""The `image_text_folder` dataset: your own images and captions as a tfds array_record build.

`data.path` names the data: a folder with `captions.csv` or `captions.jsonl` (see
`vlm_jax.data.caption_files`), or WebDataset tar shards (see `vlm_jax.data.webdataset`). The
build has the fields the pipeline and evaluators read from `shapes`: `image` uint8 [S, S, 3]
(S = data.image_size, converted and resized by `vlm_jax.data.image_convert` with
data.resize), `captions` (all captions of the image), `label` (index into the sorted label
names, -1 for an image without one; no classes at all when nothing has a label), and
`image_id` (the path relative to the folder, or 'SHARD.tar/KEY').

Every image is decoded once, before any split is written: unusable ones (path outside the
folder, missing, unreadable, corrupt; in shards also keys without image or caption, shards
that are missing or end early) are skipped, counted and listed in `build_report.json` beside
the build, and logged in one line. Zero usable images is an error. Splits come from the
`split` column where given, else from `caption_files.assign_splits`.

Builds are cached per source: the builder config's name holds a hash of the captions file's
contents (shards: their paths, sizes and modification times) and of the build settings, so a
changed captions file or setting builds anew (beside the old build, which stays until deleted)
and an unchanged one is reused, with its tokenizer.
"""
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Any, Iterable, Iterator

from absl import logging as absl_logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data import caption_files
from vlm_jax.data import image_convert
from vlm_jax.data import shapes
from vlm_jax.data import webdataset
from vlm_jax.data.caption_files import DataError, Sample

NAME = 'image_text_folder'
REPORT_FILE = 'build_report.json'
ENCODINGS = ('png', 'jpeg')
FOLDER_REASONS = ('rejected', 'missing', 'unreadable', 'corrupt')
SHARD_REASONS = ('corrupt', 'no_image', 'no_caption', 'bad_caption', 'duplicate',
                 'missing_shard', 'bad_shard')
_WHOLE_SHARD = ('missing_shard', 'bad_shard')  # skipped entries that are not one image
_CHUNK = 256  # samples decoded concurrently (tar samples hold their bytes in memory)


@dataclasses.dataclass(eq=False)
class ImageTextFolderConfig(tfds.core.BuilderConfig):
  """What one build depends on besides the files (see `builder_config`)."""
  path: str = ''
  image_size: int = 224
  resize: str = 'crop'
  encoding: str = 'png'
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0


@dataclasses.dataclass
class _Item:
  """A usable image: its encoded bytes live in the spill file at [offset, offset + size)."""
  image_id: str
  captions: list[str]
  label: str
  split: str
  offset: int
  size: int


def source_kind(path: str) -> str:
  """'folder' (a folder with a captions file) or 'webdataset'."""
  if os.path.isdir(path) and caption_files.find_captions_file(path):
    return 'folder'
  return 'webdataset'


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # the cache key: a changed file is hashed again
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _stat_key(path: str) -> tuple[str, int, int]:
  stat = os.stat(path)
  return path, stat.st_size, stat.st_mtime_ns


def _source_fingerprint(path: str) -> list[Any]:
  """What identifies the source's current contents (see the module docstring)."""
  if source_kind(path) == 'folder':
    index = caption_files.find_captions_file(path)
    return [os.path.basename(index), _file_digest(*_stat_key(index))]
  return [list(_stat_key(s)) if os.path.isfile(s) else [s, 'missing']
          for s in webdataset.resolve_shards(path)]


def builder_config(data_cfg: ml_collections.ConfigDict) -> ImageTextFolderConfig:
  """The builder config of `data_cfg.path` and the build settings in `data_cfg`."""
  if not data_cfg.path:
    raise DataError(f"data.name='{NAME}' needs --config.data.path=DIR: a folder with "
                    'captions.csv or captions.jsonl, or WebDataset *.tar shards.')
  path = os.path.abspath(os.path.expanduser(data_cfg.path))
  if not os.path.exists(path) and not re.search(r'[{*?\[]', path):
    raise DataError(f'data.path={data_cfg.path!r} does not exist.')
  if data_cfg.encoding not in ENCODINGS:
    raise DataError(f'Unknown data.encoding {data_cfg.encoding!r}; accepted: {ENCODINGS}.')
  if data_cfg.resize not in image_convert.RESIZE_MODES:
    raise DataError(f'Unknown data.resize {data_cfg.resize!r}; accepted: '
                    f'{image_convert.RESIZE_MODES}.')
  settings = dict(path=path, image_size=int(data_cfg.image_size), resize=data_cfg.resize,
                  encoding=data_cfg.encoding, val_fraction=float(data_cfg.val_fraction),
                  test_fraction=float(data_cfg.test_fraction),
                  split_seed=int(data_cfg.split_seed))
  key = json.dumps([str(ImageTextFolder.VERSION), settings, _source_fingerprint(path)],
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  base = os.path.basename(path.rstrip(os.sep)) if source_kind(path) == 'folder' else (
      os.path.basename(os.path.dirname(path)) or 'shards')
  slug = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_')[:40] or 'data'
  return ImageTextFolderConfig(name=f'{slug}_{settings["image_size"]}px_{digest}',
                               description=f'{NAME} of {path}', **settings)


class _NoCustomConfigWarning(logging.Filter):
  """tfds warns on every builder made with a config outside BUILDER_CONFIGS, which is how
  every build of this dataset is made."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith('Using custom data configuration') and
                NAME in record.getMessage())


absl_logging.get_absl_logger().addFilter(_NoCustomConfigWarning())


def make_builder(data_cfg: ml_collections.ConfigDict) -> 'ImageTextFolder':
  """The (not necessarily built) builder of `data_cfg` (data.path and the build settings)."""
  return ImageTextFolder(config=builder_config(data_cfg), data_dir=data_cfg.data_dir or None)


def report_path(data_cfg: ml_collections.ConfigDict) -> str:
  """Where the build of `data_cfg` keeps its build_report.json."""
  return os.path.join(os.fspath(make_builder(data_cfg).data_dir), REPORT_FILE)


def image_path(data_cfg: ml_collections.ConfigDict, image_id: str) -> str | None:
  """The file of a built example's `image_id` for a folder source; None for shards."""
  path = os.path.abspath(os.path.expanduser(data_cfg.path))
  if source_kind(path) != 'folder':
    return None
  return caption_files.resolve_image(path, image_id)


def _read(sample: Sample) -> tuple[bytes | None, tuple[str, str] | None]:
  """The image bytes of a sample, or the problem that stops reading them."""
  if sample.problem:
    return None, sample.problem
  if sample.data is not None:
    return sample.data, None
  try:
    with open(sample.path, 'rb') as f:
      return f.read(), None
  except FileNotFoundError:
    return None, ('missing', 'no such file')
  except OSError as e:  # a directory, no permission, an I/O error
    return None, ('unreadable', f'{type(e).__name__}: {e.strerror or e}')


def _convert(sample: Sample, config: ImageTextFolderConfig
             ) -> tuple[bytes | None, str, tuple[str, str] | None]:
  """(encoded image, source mode, None) or (None, '', problem)."""
  data, problem = _read(sample)
  if problem:
    return None, '', problem
  try:
    image, mode = image_convert.decode(data, config.image_size, config.resize)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises many types for bad files (OSError, SyntaxError, struct.error, ...): each
    # is one skipped image, never a crashed build.
    return None, '', ('corrupt', f'{type(e).__name__}: {e}')
  return shapes._encode(image, config.encoding), mode, None  # pylint: disable=protected-access


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
  chunk = []
  for sample in samples:
    chunk.append(sample)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
  """Images with captions from a folder or WebDataset shards (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, **kwargs: Any):
    kwargs.setdefault('file_format', 'array_record')  # random access for grain
    super().__init__(**kwargs)
    self._spill = None
    self._report: dict[str, Any] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8,
                                         encoding_format=self.builder_config.encoding),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'label': tfds.features.ClassLabel(),  # names set once the labels are read
            'image_id': tfds.features.Text(),
        }),
        description=f'{NAME} of {self.builder_config.path}',
    )

  def _samples(self) -> tuple[Iterable[Sample], dict[str, Any]]:
    path = self.builder_config.path
    if source_kind(path) == 'folder':
      samples, rows = caption_files.read_folder(path)
      report = {'kind': 'folder', 'index': caption_files.find_captions_file(path), **rows}
      return samples, report
    shards = webdataset.resolve_shards(path)
    return webdataset.read_shards(shards), {'kind': 'webdataset', 'shards': len(shards)}

  def _decode_all(self, samples: Iterable[Sample]) -> tuple[list[_Item], list[dict], dict]:
    """Decodes every sample into the spill file: (usable items, skipped, source modes)."""
    config = self.builder_config
    items, skipped, modes, seen, next_log = [], [], {}, set(), 10_000
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for chunk in _chunks(samples, _CHUNK):
        for sample in chunk:  # a key met twice: the first wins (tfds keys must be unique)
          if sample.image_id in seen and not sample.problem:
            sample.problem = ('duplicate', 'the same key appeared earlier')
          seen.add(sample.image_id)
        for sample, (encoded, mode, problem) in zip(
            chunk, pool.map(lambda s: _convert(s, config), chunk)):
          if problem:
            skipped.append({'image': sample.image_id, 'reason': problem[0],
                            'detail': problem[1]})
            continue
          modes[mode] = modes.get(mode, 0) + 1
          offset = self._spill.tell()
          self._spill.write(encoded)
          items.append(_Item(sample.image_id, sample.captions, sample.label, sample.split,
                             offset, len(encoded)))
        if len(items) + len(skipped) >= next_log:
          logging.info('%s: decoded %d images so far', NAME, len(items) + len(skipped))
          next_log += 10_000
    return items, skipped, dict(sorted(modes.items()))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # nothing to download
    config = self.builder_config
    samples, report = self._samples()
    self._spill = tempfile.TemporaryFile(dir=os.fspath(self.data_dir))
    items, skipped, modes = self._decode_all(samples)
    reasons = FOLDER_REASONS if report['kind'] == 'folder' else SHARD_REASONS
    counts = {r: 0 for r in reasons}
    for s in skipped:
      counts[s['reason']] = counts.get(s['reason'], 0) + 1
    if not items:
      examples = '; '.join(f'{s["image"]}: {s["reason"]} ({s["detail"]})' for s in skipped[:3])
      raise DataError(f'No usable images in data.path={config.path!r}: skipped {counts}'
                      f'{"; e.g. " + examples if examples else ""}.')
    names = sorted({item.label for item in items} - {''})
    self.info.features['label'].names = names
    splits = caption_files.assign_splits(
        [item.image_id for item in items], [item.split for item in items],
        config.val_fraction, config.test_fraction, config.split_seed)
    by_split: dict[str, list[_Item]] = {}
    for item, split in zip(items, splits):
      by_split.setdefault(split, []).append(item)
    if 'train' not in by_split:
      raise DataError(f'data.path={config.path!r}: no usable image is in the train split '
                      f'(splits: {sorted(by_split)}).')
    order = ['train', 'validation', 'test'] + sorted(set(by_split) - {'train', 'validation',
                                                                      'test'})
    by_split = {s: by_split[s] for s in order if s in by_split}
    self._report = {
        'source': config.path, **report,
        'image_size': config.image_size, 'resize': config.resize, 'encoding': config.encoding,
        'images': len(items) + sum(s['reason'] not in _WHOLE_SHARD for s in skipped),
        'usable': len(items),
        'skipped': counts, 'captions': sum(len(item.captions) for item in items),
        'splits': {s: len(v) for s, v in by_split.items()},
        'classes': names, 'unlabelled': sum(not item.label for item in items) if names else 0,
        'source_modes': modes, 'skipped_images': skipped,
    }
    return {split: self._generate_examples(split_items)
            for split, split_items in by_split.items()}

  def _generate_examples(self, items: list[_Item]) -> Iterator[tuple[str, dict[str, Any]]]:
    for item in items:
      self._spill.seek(item.offset)
      yield item.image_id, {'image': self._spill.read(item.size), 'captions': item.captions,
                            'label': item.label or -1, 'image_id': item.image_id}

  def _download_and_prepare(self, *args, **kwargs):
    try:
      super()._download_and_prepare(*args, **kwargs)
    finally:
      if self._spill is not None:
        self._spill.close()
        self._spill = None
    # Still in tfds' temporary directory: the report appears together with the build.
    path = os.path.join(os.fspath(self.data_dir), REPORT_FILE)
    with open(path, 'w') as f:
      json.dump(self._report, f, indent=2)
    report = self._report
    skipped = sum(report['skipped'].values())
    final = os.path.join(os.path.dirname(os.path.dirname(path)), str(self.VERSION), REPORT_FILE)
    logging.log(logging.WARNING if skipped else logging.INFO,
                '%s: %d usable of %d images in %s (%s), %d skipped %s, %d classes; report: %s',
                NAME, report['usable'], report['images'], report['source'],
                ', '.join(f'{k} {v}' for k, v in report['splits'].items()), skipped,
                {k: v for k, v in report['skipped'].items() if v}, len(report['classes']),
                final)
