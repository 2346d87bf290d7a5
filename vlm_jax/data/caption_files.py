"""Reading a folder of images with a captions file into samples, and the seeded split.

A folder holds images (any layout below it) and one index, `captions.csv` (a header row) or
`captions.jsonl` (one JSON object per line), with the columns

  image    path of the image relative to the folder (required)
  caption  one caption (required; in jsonl also a list of captions)
  label    class name (optional; zero-shot evaluation uses these as classes)
  split    'train', 'validation' ('val', 'valid' and 'dev' mean the same), 'test' or any
           other lower-case name (optional; images without one are split by `assign_splits`)

Several rows may name the same image: they become one sample with several captions. An image
path that leaves the folder (absolute, `..` above it, or a symbolic link whose target is
outside the folder) is never read: its sample carries the problem 'rejected'. Symbolic links
to files inside the folder are followed.
"""
import csv
import dataclasses
import hashlib
import json
import os
import re
from typing import Iterator, Sequence

from vlm_jax import cli

CAPTION_FILES = ('captions.csv', 'captions.jsonl')
COLUMNS = ('image', 'caption', 'label', 'split')
SPLIT_ALIASES = {'val': 'validation', 'valid': 'validation', 'dev': 'validation'}
_SPLIT_NAME = re.compile(r'[a-z][a-z0-9_]*')


class DataError(cli.UserError, ValueError):
  """Bad user data or data settings: the entry points print it as one line."""


@dataclasses.dataclass
class Sample:
  """One image with its captions, before decoding.

  `image_id` names it in reports and in the built dataset: its path relative to the folder,
  or 'SHARD.tar/KEY' for WebDataset shards. The image is read from `path` (a file) or is
  `data` (bytes). `problem` = (reason, detail) when it is known unusable before decoding.
  """
  image_id: str
  captions: list[str]
  label: str = ''
  split: str = ''
  path: str = ''
  data: bytes | None = None
  problem: tuple[str, str] | None = None


def find_captions_file(folder: str) -> str | None:
  """The folder's captions.csv or captions.jsonl; None if it has neither.

  Raises:
    DataError: if it has both.
  """
  found = [os.path.join(folder, name) for name in CAPTION_FILES
           if os.path.isfile(os.path.join(folder, name))]
  if len(found) > 1:
    raise DataError(f'{folder!r} has both captions.csv and captions.jsonl; keep one.')
  return found[0] if found else None


def normalize_split(value: str, where: str) -> str:
  """A `split` value -> its canonical name ('' stays ''); raises DataError if invalid."""
  split = value.strip().lower()
  split = SPLIT_ALIASES.get(split, split)
  if split and not _SPLIT_NAME.fullmatch(split):
    raise DataError(f'{where}: split {value!r} is not a valid split name; accepted: train, '
                    'validation (val, valid, dev), test, or another lower-case name '
                    '[a-z][a-z0-9_]*.')
  return split


def _csv_rows(path: str) -> Iterator[tuple[int, dict]]:
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    missing = [c for c in ('image', 'caption') if c not in columns]
    if missing:
      raise DataError(f'{path}: the header {columns} lacks the column(s) {missing}; required: '
                      "image, caption (optional: label, split).")
    for row in reader:
      yield reader.line_num, row


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict]]:
  with open(path, encoding='utf-8-sig') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{number}: not valid JSON ({e.msg}); each line must be one '
                        'object like {"image": "a.jpg", "caption": "..."}.') from None
      if not isinstance(row, dict) or 'image' not in row or 'caption' not in row:
        raise DataError(f'{path}:{number}: expected an object with keys "image" and '
                        f'"caption" (optional: "label", "split"); got {line.strip()[:80]!r}.')
      yield number, row


def _text(value, where: str, key: str) -> str:
  if value is None:
    return ''
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise DataError(f'{where}: {key} must be a string, got {value!r}.')
  return value.strip()


def _captions(value, where: str) -> list[str]:
  values = value if isinstance(value, list) else [value]
  return [c for c in (_text(v, where, 'caption') for v in values) if c]


def _relative(image: str) -> str | None:
  """`image` normalised, or None if it is absolute or climbs above its folder (`..`)."""
  if os.path.isabs(image) or image.startswith(('/', '\\')) or re.match(r'[A-Za-z]:', image):
    return None
  relative = os.path.normpath(image)
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    return None
  return relative


def is_inside(folder: str, path: str) -> bool:
  """Whether `path`, with every symbolic link resolved, lies inside `folder` (also resolved)."""
  real_folder = os.path.realpath(folder)
  return os.path.commonpath([real_folder, os.path.realpath(path)]) == real_folder


def resolve_image(folder: str, image: str) -> str | None:
  """The file of `image` inside `folder`, or None if the path leaves the folder, by its
  text (absolute, `..`) or through a symbolic link."""
  relative = _relative(image)
  if relative is None:
    return None
  path = os.path.join(folder, relative)
  return path if is_inside(folder, path) else None


def _rejection(image: str) -> str:
  """Why `resolve_image` refused `image`."""
  if _relative(image) is None:
    return 'the path leaves the folder'
  return 'a symbolic link on its path leads outside the folder'


def _merge(sample: Sample, key: str, value: str, where: str) -> None:
  """Sets `sample.<key>` (label or split) to `value`, refusing a different earlier value."""
  old = getattr(sample, key)
  if value and old and value != old:
    raise DataError(f'{where}: image {sample.image_id!r} has {key} {value!r} here but {old!r} '
                    f'in an earlier row; an image has one {key}.')
  setattr(sample, key, old or value)


def read_folder(folder: str) -> tuple[list[Sample], dict[str, int]]:
  """The samples of a folder's captions file, in order of first appearance.

  Returns:
    (samples, row counts: {'rows', 'rows_without_caption', 'rows_without_image'}).

  Raises:
    DataError: no captions file, a malformed one, or an image given two labels or splits.
  """
  path = find_captions_file(folder)
  if path is None:
    raise DataError(f'{folder!r} has no captions.csv or captions.jsonl (columns image, '
                    'caption, optional label and split), and no *.tar shards.')
  rows = _csv_rows(path) if path.endswith('.csv') else _jsonl_rows(path)
  samples: dict[str, Sample] = {}
  counts = {'rows': 0, 'rows_without_caption': 0, 'rows_without_image': 0}
  for number, row in rows:
    where = f'{os.path.basename(path)}:{number}'
    counts['rows'] += 1
    image = _text(row.get('image'), where, 'image')
    captions = _captions(row.get('caption'), where)
    if not image:
      counts['rows_without_image'] += 1
      continue
    if not captions:
      counts['rows_without_caption'] += 1
      continue
    file = resolve_image(folder, image)
    image_id = os.path.normpath(image) if file else image
    sample = samples.get(image_id)
    if sample is None:
      sample = samples[image_id] = Sample(image_id, [], path=file or '')
      if file is None:
        sample.problem = ('rejected', _rejection(image))
    sample.captions.extend(c for c in captions if c not in sample.captions)
    _merge(sample, 'label', _text(row.get('label'), where, 'label'), where)
    _merge(sample, 'split', normalize_split(_text(row.get('split'), where, 'split'), where),
           where)
  return list(samples.values()), counts


def _order(seed: int, image_id: str) -> bytes:
  return hashlib.blake2b(f'{seed}\0{image_id}'.encode(), digest_size=16).digest()


def _eval_count(n: int, fraction: float) -> int:
  return 0 if fraction == 0 else max(1, round(n * fraction))


def assign_splits(image_ids: Sequence[str], given: Sequence[str], val_fraction: float,
                  test_fraction: float, seed: int) -> list[str]:
  """Split names for N images: `given[i]` where set, else a seeded split of the rest.

  The images without a given split are ordered by a hash of (seed, image_id); the first
  round(n * test_fraction) go to 'test', the next round(n * val_fraction) to 'validation'
  (at least one each when the fraction is positive) and the rest to 'train'. Ordering by a
  hash rather than a permutation keeps each image's split when other images come or go,
  except near the boundaries.
  """
  for name, fraction in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    if not 0 <= fraction < 1:
      raise DataError(f'data.{name}={fraction} must be in [0, 1).')
  if val_fraction + test_fraction >= 1:
    raise DataError(f'data.val_fraction + data.test_fraction = '
                    f'{val_fraction + test_fraction} leaves nothing for train; keep it < 1.')
  free = sorted((i for i, s in enumerate(given) if not s),
                key=lambda i: _order(seed, image_ids[i]))
  n_test, n_val = _eval_count(len(free), test_fraction), _eval_count(len(free), val_fraction)
  if free and len(free) - n_test - n_val < 1:
    raise DataError(f'Only {len(free)} usable image(s) without a split value: too few for '
                    f'data.val_fraction={val_fraction} and data.test_fraction={test_fraction} '
                    '(each positive fraction takes at least one image and train needs one); '
                    'add images, give them a split column, or set the fractions to 0.')
  splits = list(given)
  for rank, i in enumerate(free):
    splits[i] = 'test' if rank < n_test else 'validation' if rank < n_test + n_val else 'train'
  return splits

