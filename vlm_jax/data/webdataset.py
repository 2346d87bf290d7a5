"""Reading WebDataset tar shards (as img2dataset writes them) into samples, with `tarfile`.

A shard is a tar file whose members are grouped by key: the member path up to the first dot
of its file name ('00001/000010042.jpg' has key '00001/000010042' and extension 'jpg'), the
files of one key stored next to each other. A sample is a key with an image (.jpg, .jpeg,
.png or .webp) and a caption: the .txt file, else the "caption" of the .json file (a string
or a list of strings). The .json file may also give "label" and "split" (see
`caption_files`). Shards are read sequentially, so compressed tars (.tar.gz) work too.

Keys that have no image or no caption, shards that are missing or end early, become samples
with a `problem`, so that they appear in the build report instead of stopping the build.
"""
import glob
import json
import os
import re
import tarfile
from typing import Iterator

from vlm_jax.data import caption_files
from vlm_jax.data.caption_files import DataError, Sample, normalize_split

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'(\d+)\.\.(\d+)')


def expand_braces(pattern: str) -> list[str]:
  """'s/{00000..00002}.tar' -> ['s/00000.tar', 's/00001.tar', 's/00002.tar']; '{a,b}'
  alternatives too; several braces expand as a product, left to right."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numbers = _RANGE.fullmatch(body)
  if numbers:
    first, last = numbers.groups()
    if int(first) > int(last):
      raise DataError(f'Shard pattern {pattern!r}: the range {{{body}}} runs backwards.')
    width = len(first) if first.startswith('0') and len(first) > 1 else 0
    options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
  elif ',' in body:
    options = body.split(',')
  else:
    raise DataError(f'Shard pattern {pattern!r}: {{{body}}} is neither a range like '
                    '{00000..00009} nor alternatives like {a,b}.')
  head, tail = pattern[:match.start()], expand_braces(pattern[match.end():])
  return [head + option + rest for option in options for rest in tail]


def resolve_shards(path: str) -> list[str]:
  """The shard files of `path`: a directory (its *.tar files), one .tar file, a brace pattern
  (`dir/{00000..00009}.tar`, every expansion listed even if missing) or a glob (`dir/*.tar`).

  Raises:
    DataError: when `path` names no shard at all.
  """
  if '{' in path:
    shards = expand_braces(path)
  elif any(c in path for c in '*?['):
    shards = sorted(glob.glob(path))
  elif os.path.isdir(path):
    shards = sorted(glob.glob(os.path.join(path, '*.tar')))
    outside = [s for s in shards if not caption_files.is_inside(path, s)]
    if outside:
      raise DataError(f'data.path={path!r}: the shard {os.path.basename(outside[0])!r} is a '
                      f'symbolic link to {os.path.realpath(outside[0])!r}, outside the folder; '
                      'copy it in, or name the shards with a pattern (dir/*.tar).')
  elif os.path.isfile(path) and '.tar' in os.path.basename(path):
    shards = [path]
  else:
    shards = []
  if not shards:
    raise DataError(f'data.path={path!r} names no data: expected a folder with captions.csv '
                    'or captions.jsonl, a folder of WebDataset *.tar shards, a .tar file, or a '
                    "pattern like 'shards/{00000..00009}.tar'.")
  return shards


def _split_name(name: str) -> tuple[str, str]:
  """Tar member path -> (key, lower-case extension)."""
  directory, base = os.path.split(name)
  stem, _, extension = base.partition('.')
  return os.path.join(directory, stem), extension.lower()


def _sample(shard: str, key: str, files: dict[str, bytes]) -> Sample:
  """The sample of one key's files."""
  image_id = f'{os.path.basename(shard)}/{key}'
  meta, captions = {}, []
  try:
    if 'json' in files:
      meta = json.loads(files['json'].decode('utf-8'))
      if not isinstance(meta, dict):
        raise ValueError('not a JSON object')
    if 'txt' in files:
      captions = [files['txt'].decode('utf-8').strip()]
    else:
      value = meta.get('caption')
      captions = [str(c).strip() for c in (value if isinstance(value, list) else [value])
                  if c is not None]
    label = meta.get('label')
    label = '' if label is None else str(label).strip()
    split = normalize_split(str(meta.get('split') or ''), image_id)
  except (UnicodeDecodeError, ValueError) as e:
    return Sample(image_id, [], problem=('bad_caption', f'{type(e).__name__}: {e}'))
  captions = [c for c in captions if c]
  image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
  if image is None:
    return Sample(image_id, captions, problem=(
        'no_image', f'no .{"/.".join(IMAGE_EXTENSIONS)} file for key (has {sorted(files)})'))
  if not captions:
    return Sample(image_id, [], problem=('no_caption', 'no .txt file and no "caption" in .json'))
  return Sample(image_id, captions, label=label, split=split, data=image)


def _shard_samples(shard: str) -> Iterator[Sample]:
  """The samples of one shard, then, if it cannot be read to the end, a 'bad_shard' one."""
  key, files = None, {}
  try:
    with tarfile.open(shard, 'r:*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        member_key, extension = _split_name(member.name)
        if member_key != key:
          if files:
            yield _sample(shard, key, files)
          key, files = member_key, {}
        if extension in IMAGE_EXTENSIONS + ('txt', 'json'):
          files[extension] = tar.extractfile(member).read()
      # tarfile takes a header cut short for the end of the archive: look for the zero
      # blocks that really end one.
      tar.fileobj.seek(tar.offset)
      end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
      if len(end) < tarfile.BLOCKSIZE or end.strip(b'\0'):
        raise tarfile.ReadError(f'the archive breaks off at byte {tar.offset} (no '
                                'end-of-archive blocks)')
      if files:
        yield _sample(shard, key, files)
  except (tarfile.TarError, EOFError, OSError) as e:
    # The key being read when the shard broke off is dropped with it.
    yield Sample(os.path.basename(shard), [], problem=('bad_shard', f'{type(e).__name__}: {e}'))


def read_shards(shards: list[str]) -> Iterator[Sample]:
  """The samples of every shard in turn; a missing shard yields a 'missing_shard' sample."""
  for shard in shards:
    if not os.path.isfile(shard):
      yield Sample(shard, [], problem=('missing_shard', 'no such file'))
      continue
    yield from _shard_samples(shard)
