"""Fast reads of single fields from serialised tfds records (`tf.train.Example` bytes).

tfds' own numpy decoding of a whole example costs ~200 us; parsing the proto and decoding
only the fields a train step needs (image and captions) costs ~50 us, which is what lets one
CPU thread feed thousands of examples per second.
"""
import io
import math
import struct
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

Features = Mapping[str, Any]  # a `tf.train.Features.feature` map: name -> Feature


def parse(record: bytes) -> Features:
  """The feature map of one serialised example."""
  return tf_example_pb2.Example.FromString(record).features.feature


def parse_each(serialized: Iterable[bytes]) -> Iterator[Features]:
  """The feature map of each record, parsed into one reused message: each map is valid only
  until the next one is yielded (read what you need from it first).

  Why not `parse` in a loop: protobuf's upb runtime calls `malloc_trim(0)` after every
  10,000 blocks it frees, and a freshly parsed message frees a few blocks when it dies. A
  trim hands every free page of the process back to the kernel, XLA's temp buffer between
  two train steps included, which the next step then page-faults in again (see
  vlm_jax/training/cpu_backend.py): on `clip_shapes.py`, 310 faults per step on average
  with `parse`, none with `parse_each`; the larger the temp buffer, the dearer each trim.
  One message per call frees its blocks once, when the call ends (a reused message parses
  in 7 us instead of 3).
  """
  message = tf_example_pb2.Example()
  for record in serialized:
    message.ParseFromString(record)
    yield message.features.feature


def _feature(features: Features, key: str):
  if key not in features:
    raise KeyError(f'Record has no feature {key!r}; it has {sorted(features.keys())}.')
  return features[key]


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _plain_rgb_png_parts(encoded: bytes) -> tuple[tuple[int, int], bytes] | None:
  """((width, height), the concatenated IDAT chunks) of an 8-bit, non-interlaced RGB PNG
  (what the tfds builders write), or None for any other PNG or JPEG, or a damaged one."""
  if not encoded.startswith(_PNG_SIGNATURE):
    return None
  pos, size, idat = len(_PNG_SIGNATURE), None, []
  while pos + 8 <= len(encoded):
    length, kind = struct.unpack_from('>I4s', encoded, pos)
    data = encoded[pos + 8:pos + 8 + length]
    if kind == b'IHDR':
      if len(data) != 13:
        return None
      width, height, depth, color, _, _, interlace = struct.unpack('>IIBBBBB', data)
      if (depth, color, interlace) != (8, 2, 0):  # 8-bit truecolour, no Adam7
        return None
      size = (width, height)
    elif kind == b'IDAT':
      idat.append(data)
    elif kind == b'IEND':
      break
    pos += length + 12  # length, type, data, CRC
  if size is None or not idat:
    return None
  return size, b''.join(idat)


def _plain_rgb_png(encoded: bytes) -> np.ndarray | None:
  """uint8 [H, W, 3] of an 8-bit, non-interlaced RGB PNG, or None for any other PNG or JPEG.

  It hands the IDAT chunks straight to PIL's PNG ('zip') decoder: on 32 px images that
  decodes 21,000 images/s on one Xeon core, `Image.open` 14,000 (the file plugin's set-up
  dominates).
  """
  parts = _plain_rgb_png_parts(encoded)
  if parts is None:
    return None
  return np.asarray(Image.frombytes('RGB', parts[0], parts[1], 'zip', 'RGB'))


def _decode_image(encoded: bytes) -> np.ndarray:
  """uint8 [H, W, 3] of a PNG or JPEG file's bytes."""
  try:
    plain = _plain_rgb_png(encoded)
  except (ValueError, OSError):
    plain = None  # a damaged file: PIL below says what is wrong with it
  if plain is not None:
    return plain
  with Image.open(io.BytesIO(encoded), formats=('PNG', 'JPEG')) as img:
    if img.mode != 'RGB':
      img = img.convert('RGB')
    return np.asarray(img)


def decode_images(encoded: Sequence[bytes]) -> np.ndarray:
  """uint8 [B, H, W, 3] (a new, writable array) of B PNG or JPEG files of one size
  (ValueError for mixed sizes).

  Plain RGB PNGs of the first one's size are decoded into rows of one PIL image, which
  is converted to numpy once: on 32 px images that halves the per-image overhead of PIL
  (an image, a decoder and a copy each), 33 us instead of 52 on one EPYC core. Other files,
  and any that this path cannot decode, go through `image`'s decoder.
  """
  if not encoded:
    raise ValueError('decode_images needs at least one image.')
  first = _plain_rgb_png_parts(encoded[0])
  if first is None:
    return _stack([_decode_image(e) for e in encoded])
  (width, height), _ = first
  batch = Image.new('RGB', (width, height * len(encoded)))  # image r: rows [r H, (r + 1) H)
  others = {}
  for r, one in enumerate(encoded):
    parts = first if r == 0 else _plain_rgb_png_parts(one)
    if parts is None or parts[0] != (width, height) or not _decode_into(
        batch, (0, r * height, width, (r + 1) * height), parts[1]):
      others[r] = _decode_image(one)  # raises for a damaged file
  images = np.array(batch).reshape(len(encoded), height, width, 3)  # writable
  if others:
    images = _stack([others[r] if r in others else images[r] for r in range(len(encoded))])
  return images


def raw_images(values: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
  """uint8 [B, *shape] (a new, writable array) of B raw-pixel values: the row-major bytes
  that a tfds `Tensor(dtype=uint8, encoding=BYTES)` feature stores, as in the `shapes`
  builds. Nothing to decode: a batch of 32 px images takes about 1 us per image."""
  size = math.prod(shape)
  for r, value in enumerate(values):
    if len(value) != size:
      raise ValueError(f'Image {r} of the batch has {len(value)} bytes; raw uint8 '
                       f'{list(shape)} images have {size}.')
  return np.frombuffer(bytearray().join(values), np.uint8).reshape(len(values), *shape)


def _decode_into(batch: Image.Image, box: tuple[int, int, int, int], idat: bytes) -> bool:
  """Decodes a plain RGB PNG's IDAT data into `box` (left, top, right, bottom) of `batch`;
  False when the data is damaged or too short (what `Image.frombytes` checks)."""
  try:  # PIL's own `Image.frombytes` makes its decoder so, but for the whole image
    decoder = Image._getdecoder('RGB', 'zip', ('RGB',))  # pylint: disable=protected-access
  except (AttributeError, OSError):
    return False
  try:
    decoder.setimage(batch.im, box)
    consumed, error = decoder.decode(idat)
  except (ValueError, OSError):
    return False
  finally:
    decoder.cleanup()
  return consumed < 0 and error == 0


def _stack(images: Sequence[np.ndarray]) -> np.ndarray:
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    raise ValueError(f'Images of one batch must have one size; got {shapes}.')
  return np.stack(images)


def image(features: Features, key: str = 'image') -> np.ndarray:
  """The decoded (PNG or JPEG) RGB image, uint8 [H, W, 3]."""
  return _decode_image(encoded_image(features, key))


def encoded_image(features: Features, key: str = 'image') -> bytes:
  """The bytes of an image feature: a PNG or JPEG file (decode a batch of them with
  `decode_images`), or raw pixels (`raw_images`)."""
  return _feature(features, key).bytes_list.value[0]


def texts(features: Features, key: str) -> list[str]:
  """A Text or Sequence(Text) feature as a list of strings (empty for an empty sequence)."""
  return [b.decode('utf-8') for b in _feature(features, key).bytes_list.value]


def integer(features: Features, key: str, default: int | None = None) -> int:
  """The first value of an integer feature; `default` (when given) if the record lacks it."""
  if key not in features and default is not None:
    return default
  return int(_feature(features, key).int64_list.value[0])
