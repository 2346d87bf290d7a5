"""Field reads from serialised records, and `parse_each`'s reused message."""
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

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
    np.testing.assert_array_equal(records.image(features), records.image(alone))
    assert records.texts(features, 'captions') == records.texts(alone, 'captions')
