"""Field reads from serialised records, `parse_each`'s reused message, and the ArrayRecord
source of raw records."""
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from vlm_jax.data import array_records
from vlm_jax.data import datasets
from vlm_jax.data import records


def _record(**features) -> bytes:
  example = tf_example_pb2.Example()
  for key, value in features.items():
    feature = example.features.feature[key]
    if isinstance(value, int):
      feature.int64_list.value.append(value)
    else:
      feature.bytes_list.value.extend(v.encode() for v in value)
  return example.SerializeToString()


def test_parse_each_reads_what_parse_reads_and_nothing_of_earlier_records():
  serialized = [_record(captions=['a red circle', 'a circle'], label=3, hard_negative=['x']),
                _record(captions=['a blue star'], label=7),
                _record(captions=[], num_objects=2)]
  for features, record in zip(records.parse_each(serialized), serialized, strict=True):
    alone = records.parse(record)
    assert sorted(features.keys()) == sorted(alone.keys())
    assert records.texts(features, 'captions') == records.texts(alone, 'captions')
    assert (records.integer(features, 'label', default=-1)
            == records.integer(alone, 'label', default=-1))
  assert 'hard_negative' not in records.parse(serialized[1])


def test_parse_each_on_dataset_records(small_data_cfg):
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  serialized = [source[i] for i in range(20)]
  for features, record in zip(records.parse_each(serialized), serialized, strict=True):
    alone = records.parse(record)
    assert records.encoded_image(features) == records.encoded_image(alone)
    assert records.texts(features, 'captions') == records.texts(alone, 'captions')


def _image_record(img, format_, **save) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  img.save(buffer, format=format_, **save)
  example = tf_example_pb2.Example()
  example.features.feature['image'].bytes_list.value.append(buffer.getvalue())
  return example.SerializeToString()


def test_image_decodes_like_pil_for_every_kind_of_file():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  smooth = np.cumsum(rng.randint(0, 3, (37, 23, 3)), axis=1).astype(np.uint8)  # varied filters
  noise = rng.randint(0, 256, (64, 48, 3)).astype(np.uint8)
  large = rng.randint(0, 256, (200, 190, 3)).astype(np.uint8)  # PIL splits its IDAT chunks
  cases = [(Image.fromarray(a), 'PNG', {}) for a in (smooth, noise, large)]
  cases += [(Image.fromarray(noise), 'PNG', {'compress_level': 0}),  # stored blocks
            (Image.fromarray(smooth), 'PNG', {'optimize': True}),
            (Image.fromarray(noise).convert('RGBA'), 'PNG', {}),   # PIL's path: RGBA -> RGB
            (Image.fromarray(noise).convert('L'), 'PNG', {}),      # grey -> RGB
            (Image.fromarray(noise).convert('P'), 'PNG', {}),      # palette -> RGB
            (Image.fromarray(noise), 'JPEG', {'quality': 90})]
  for img, format_, save in cases:
    features = records.parse(_image_record(img, format_, **save))
    got = records.image(features)
    assert got.dtype == np.uint8 and got.shape == (img.height, img.width, 3)
    np.testing.assert_array_equal(got, np.asarray(img.convert('RGB')) if format_ == 'PNG'
                                  else got)  # JPEG: lossy, its shape is checked above
    encoded = features['image'].bytes_list.value[0]
    plain = records._plain_rgb_png(encoded)  # pylint: disable=protected-access
    assert (plain is not None) == (format_ == 'PNG' and img.mode == 'RGB')


def test_a_damaged_png_is_an_error_not_an_image():
  import pytest  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  noise = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
  record = records.parse(_image_record(Image.fromarray(noise), 'PNG'))
  encoded = bytearray(record['image'].bytes_list.value[0])
  encoded[60:80] = bytes(20)  # inside the compressed pixels
  example = tf_example_pb2.Example()
  example.features.feature['image'].bytes_list.value.append(bytes(encoded))
  with pytest.raises((OSError, ValueError, SyntaxError)):
    records.image(records.parse(example.SerializeToString()))


def _encoded(img, format_='PNG', **save) -> bytes:
  return records.parse(_image_record(img, format_, **save))['image'].bytes_list.value[0]


def test_decode_images_equals_one_by_one_decoding():
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(1)
  smooth = [np.cumsum(rng.randint(0, 3, (12, 9, 3)), axis=0).astype(np.uint8)
            for _ in range(3)]  # PIL picks varied row filters
  noise = rng.randint(0, 256, (12, 9, 3)).astype(np.uint8)
  plain = [_encoded(Image.fromarray(a)) for a in smooth + [noise]]
  plain.append(_encoded(Image.fromarray(noise), compress_level=0))  # stored blocks
  others = [_encoded(Image.fromarray(noise).convert('RGBA')),  # not plain RGB: PIL's path
            _encoded(Image.fromarray(noise), 'JPEG', quality=90)]
  for batch in (plain, plain[:1], plain[:2] + others + plain[2:], others + plain):
    got = records.decode_images(batch)
    assert got.dtype == np.uint8 and got.shape == (len(batch), 12, 9, 3)
    for image, encoded in zip(got, batch, strict=True):
      with Image.open(io.BytesIO(encoded)) as want:
        np.testing.assert_array_equal(image, np.asarray(want.convert('RGB')))
    got[:, 0] = 0  # a new, writable array


def test_decode_images_errors():
  import pytest  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  noise = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
  good = _encoded(Image.fromarray(noise))
  with pytest.raises(ValueError, match=r'one size; got \[\(8, 16, 3\), \(16, 16, 3\)\]'):
    records.decode_images([good, _encoded(Image.fromarray(noise[:8]))])
  with pytest.raises(ValueError, match='at least one image'):
    records.decode_images([])
  damaged = bytearray(good)
  damaged[60:80] = bytes(20)  # inside the compressed pixels
  for batch in ([good, bytes(damaged)], [bytes(damaged), good]):
    with pytest.raises((OSError, ValueError, SyntaxError)):
      records.decode_images(batch)


def test_raw_images_are_the_row_major_pixels():
  arrays = np.random.RandomState(2).randint(0, 256, (3, 5, 4, 3)).astype(np.uint8)
  got = records.raw_images([a.tobytes() for a in arrays], (5, 4, 3))
  assert got.dtype == np.uint8 and got.shape == (3, 5, 4, 3)
  np.testing.assert_array_equal(got, arrays)
  got[:, 0] = 0  # a new, writable array
  with pytest.raises(ValueError, match=r'Image 1 of the batch has 59 bytes; raw uint8 '
                                       r'\[5, 4, 3\] images have 60\.'):
    records.raw_images([arrays[0].tobytes(), arrays[1].tobytes()[:-1]], (5, 4, 3))


def test_shapes_records_hold_raw_pixels(small_data_cfg):
  assert datasets.raw_image_shape(small_data_cfg) == (32, 32, 3)
  raw = datasets.data_source(small_data_cfg, 'test', raw=True)
  decoded = datasets.data_source(small_data_cfg, 'test')
  values = [records.encoded_image(records.parse(raw[i])) for i in range(5)]
  np.testing.assert_array_equal(records.raw_images(values, (32, 32, 3)),
                                np.stack([decoded[i]['image'] for i in range(5)]))


@pytest.mark.parametrize('split', ['train', 'train[3:150]', 'test'])
def test_array_record_source_reads_what_tfds_reads(shapes_small_cfg, split):
  ours = datasets.data_source(shapes_small_cfg, split, raw=True)
  assert isinstance(ours, array_records.ArrayRecordSource)
  reference = datasets.get_builder(shapes_small_cfg).as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  n = len(reference)
  assert len(ours) == n
  keys = [int(k) for k in np.random.default_rng(0).integers(0, n, 50)] + [n - 1, 0, 0]
  assert ours.__getitems__(keys) == reference.__getitems__(keys)
  assert ours[n - 1] == ours[-1] == reference[n - 1]
  assert pickle.loads(pickle.dumps(ours))[7] == reference[7]
  with pytest.raises(IndexError, match=f'in \\[0, {n}\\)'):
    ours.__getitems__([0, n])
