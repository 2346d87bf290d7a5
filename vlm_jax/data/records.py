"""Fast reads of single fields from serialised tfds records (`tf.train.Example` bytes).

tfds' own numpy decoding of a whole example costs ~200 us; parsing the proto and decoding
only the fields a train step needs (image and captions) costs ~50 us, which is what lets one
CPU thread feed thousands of examples per second.
"""
import io
from typing import Any, Iterable, Iterator, Mapping

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


def image(features: Features, key: str = 'image') -> np.ndarray:
  """The decoded (PNG or JPEG) RGB image, uint8 [H, W, 3]."""
  encoded = _feature(features, key).bytes_list.value[0]
  with Image.open(io.BytesIO(encoded), formats=('PNG', 'JPEG')) as img:
    if img.mode != 'RGB':
      img = img.convert('RGB')
    return np.asarray(img)


def texts(features: Features, key: str) -> list[str]:
  """A Text or Sequence(Text) feature as a list of strings (empty for an empty sequence)."""
  return [b.decode('utf-8') for b in _feature(features, key).bytes_list.value]


def integer(features: Features, key: str, default: int | None = None) -> int:
  """The first value of an integer feature; `default` (when given) if the record lacks it."""
  if key not in features and default is not None:
    return default
  return int(_feature(features, key).int64_list.value[0])
