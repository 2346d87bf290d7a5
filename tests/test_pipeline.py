"""The input pipeline: batches, determinism, exact resume, process sharding, flips, errors."""
import functools
import itertools
import json
import os

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.data import records
from vlm_jax.data import shapes
from vlm_jax.data import shapes_text


@pytest.fixture(scope='module')
def tok(shapes_small_cfg):
  return datasets.load_tokenizer(shapes_small_cfg)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches(small_data_cfg, tok):
  batch, = _take(pipeline.make_train_iterator(small_data_cfg, tok, 16, seed=0), 1)
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (16, 32, 32, 3)
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['text_ids'].dtype == np.int32 and batch['text_ids'].shape == (16, 16)
  assert batch['text_mask'].dtype == np.bool_ and batch['text_mask'].shape == (16, 16)
  assert (batch['text_ids'][:, 0] == tok.bos_id).all()
  for text in tok.decode_batch(batch['text_ids']):  # mentions a colour and a shape
    assert set(text.split()) & set(shapes.COLORS) and set(text.split()) & set(shapes.SHAPES)


def test_labels_name_the_object_of_one_object_images(small_data_cfg, tok):
  small_data_cfg.labels = True
  batch, = _take(pipeline.make_train_iterator(small_data_cfg, tok, 64, seed=0), 1)
  labels = batch['label']
  assert labels.dtype == np.int32 and labels.shape == (64,)
  assert 0 < (labels == -1).sum() < 64  # two-object images have no label
  for label, text in zip(labels, tok.decode_batch(batch['text_ids'])):
    color, shape = shapes.CLASS_NAMES[label].split() if label >= 0 else (None, None)
    words = set(text.split())
    if label >= 0:
      assert {color, shape} <= words, (text, shapes.CLASS_NAMES[label])
    else:
      assert words & set(shapes.COLORS), text  # (the second object may be truncated off)


def test_raw_and_png_records_give_the_same_batches(small_data_cfg, tok):
  """The raw-pixel build against the same records with their images stored as PNG files
  (the path of `image_text_folder` builds and of shapes builds before version 2)."""
  small_data_cfg.hard_negatives = small_data_cfg.labels = small_data_cfg.flip = True
  raw = datasets.data_source(small_data_cfg, 'train', raw=True)
  ids = (np.arange(40) * 37) % len(raw)
  as_png = {}
  for i in ids:
    example = records.parse(raw[int(i)])
    pixels = np.frombuffer(records.encoded_image(example), np.uint8).reshape(32, 32, 3)
    as_png[int(i)] = _with_image(raw[int(i)], shapes._encode(pixels, 'png'))  # pylint: disable=protected-access
  read = functools.partial(pipeline._read_batch, 3, ids, seed=5, data_cfg=small_data_cfg,  # pylint: disable=protected-access
                           tokenizer=tok)
  want = read(source=raw, raw_image_shape=(32, 32, 3))
  got = read(source=as_png)
  assert want['image'].shape == (40, 32, 32, 3)
  _assert_batches_equal([got], [want])


def _with_image(record: bytes, image: bytes) -> bytes:
  example = tf_example_pb2.Example.FromString(record)
  example.features.feature['image'].bytes_list.value[0] = image
  return example.SerializeToString()


def test_deterministic_for_a_seed(small_data_cfg, tok):
  a = _take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=3), 3)
  b = _take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=3), 3)
  c = _take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=4), 1)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_epochs_are_reshuffled_and_complete(small_data_cfg, tok):
  ds = pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=0)  # 512 examples: 8 / epoch
  epochs = [np.concatenate([ds[e * 8 + k]['image'] for k in range(8)]) for e in range(2)]
  keys = [sorted(im.tobytes() for im in images) for images in epochs]
  assert keys[0] == keys[1] and len(set(keys[0])) == 512  # each example once per epoch
  assert not np.array_equal(epochs[0], epochs[1])  # in another order


def test_resume_is_exact(small_data_cfg, tok):
  uninterrupted = _take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=1), 12)
  first = pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=1)
  _take(first, 9)
  state = json.loads(json.dumps(first.get_state()))  # saved with the checkpoint as JSON
  resumed = pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=1)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), uninterrupted[9:])


def test_resume_across_epochs(small_data_cfg, tok):
  uninterrupted = _take(pipeline.make_train_iterator(small_data_cfg, tok, 128, seed=2), 6)
  first = pipeline.make_train_iterator(small_data_cfg, tok, 128, seed=2)
  _take(first, 5)  # 640 examples: into the second epoch
  resumed = pipeline.make_train_iterator(small_data_cfg, tok, 128, seed=2)
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  _assert_batches_equal(_take(resumed, 1), uninterrupted[5:])


def test_processes_read_disjoint_halves_of_each_global_batch(small_data_cfg, tok):
  whole = _take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=0), 2)
  halves = [_take(pipeline.make_train_iterator(small_data_cfg, tok, 32, seed=0,
                                               process_index=p, process_count=2), 2)
            for p in range(2)]
  for step in range(2):
    for k in whole[step]:
      assert halves[0][step][k].shape[0] == 16
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][k], halves[1][step][k]]), whole[step][k])


def test_curriculum_draws_simple_scenes_with_the_words_first(small_data_cfg, tok):
  plain = pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0)
  small_data_cfg.labels = True
  small_data_cfg.curriculum.steps = 2
  small_data_cfg.curriculum.words = ('Left', 'right')
  taught = pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0)
  for step in range(2):
    batch = taught[step]
    assert (batch['label'] >= 0).all()  # one-object scenes only
    texts = tok.decode_batch(batch['text_ids'])
    with_words = [('left' in t.split()) or ('right' in t.split()) for t in texts]
    assert sum(with_words) > 8, texts  # the plain stream has about 4 in 32
  for step in (2, 3):  # then the plain stream
    batch = dict(taught[step])
    del batch['label']
    _assert_batches_equal([batch], [plain[step]])
  halves = [pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0, process_index=p,
                                        process_count=2) for p in range(2)]
  for step in range(3):
    for k, whole in taught[step].items():
      np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]),
                                    whole, err_msg=k)


def test_curriculum_gives_first_captions_until_first_caption_steps(small_data_cfg, tok):
  plain = pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0)
  small_data_cfg.curriculum.steps = 1
  small_data_cfg.curriculum.first_caption_steps = 3
  taught = pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0)
  examples = pipeline.eval_examples(small_data_cfg, 'train')
  first = {c[0] for c in examples['captions']}
  for step in (1, 2):  # after the one-object step: every caption is its example's first
    np.testing.assert_array_equal(taught[step]['image'], plain[step]['image'])
    texts = tok.decode_batch(taught[step]['text_ids'])
    assert all(t in first for t in texts), [t for t in texts if t not in first]
    assert sum(t in first for t in tok.decode_batch(plain[step]['text_ids'])) < 16
  _assert_batches_equal([taught[3]], [plain[3]])  # then the plain stream


def test_simple_example_ids_count_objects(small_data_cfg):
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  ids = pipeline.simple_example_ids(source, 1)
  objects = [records.integer(records.parse(source[int(i)]), 'num_objects') for i in ids[:20]]
  assert objects == [1] * 20 and 0 < len(ids) < len(source)
  assert len(pipeline.simple_example_ids(source, 2)) == len(source)


def test_flip_mirrors_images_and_swaps_left_right(small_data_cfg, tok):
  plain = pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)[0]
  small_data_cfg.flip = True
  flipped = pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)[0]
  plain_text = tok.decode_batch(plain['text_ids'])
  flipped_text = tok.decode_batch(flipped['text_ids'])
  was_flipped = [not np.array_equal(a, b) for a, b in zip(plain['image'], flipped['image'])]
  assert 10 < sum(was_flipped) < 54
  for i, f in enumerate(was_flipped):
    if f:
      np.testing.assert_array_equal(flipped['image'][i], plain['image'][i][:, ::-1])
      assert flipped_text[i] == shapes.flip_caption(plain_text[i])
    else:
      assert flipped_text[i] == plain_text[i]
  assert any('left' in t or 'right' in t for t, f in zip(plain_text, was_flipped) if f)


def test_drop_color_removes_only_colour_words(small_data_cfg, tok):
  assert (shapes_text.drop_colors('a small red circle above a blue star', ['red', 'blue'])
          == 'a small circle above a star')
  assert shapes_text.drop_colors('a large square that is red', ['red']) == 'a large square'
  plain = pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)[0]
  small_data_cfg.drop_color_prob = 0.5
  dropped = pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)[0]
  np.testing.assert_array_equal(dropped['image'], plain['image'])
  colors = set(shapes.COLORS)
  changed = 0
  for before, after in zip(tok.decode_batch(plain['text_ids']),
                           tok.decode_batch(dropped['text_ids'])):
    if before != after:
      changed += 1
      assert not colors & set(after.split())
      assert [w for w in before.split() if w not in colors and w not in ('that', 'is')] == [
          w for w in after.split() if w not in ('that', 'is')]
  assert 16 < changed < 48
  small_data_cfg.drop_color_prob = 1.5
  with pytest.raises(ValueError, match=r'drop_color_prob=1.5 must be in \[0, 1\]'):
    pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)
  small_data_cfg.drop_color_prob, small_data_cfg.name = 0.5, 'image_text_folder'
  with pytest.raises(ValueError, match="only for data.name='shapes'"):
    pipeline.make_train_dataset(small_data_cfg, tok, 64, seed=5)


def test_bad_batch_sizes(small_data_cfg, tok):
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    pipeline.make_train_dataset(small_data_cfg, tok, 30, seed=0, process_count=4)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.make_train_dataset(small_data_cfg, tok, 32, seed=0, process_index=2,
                                process_count=2)


def test_eval_examples(small_data_cfg):
  ex = pipeline.eval_examples(small_data_cfg, 'test_novel')
  assert ex['image'].shape == (128, 32, 32, 3) and ex['image'].dtype == np.float32
  assert ex['label'].shape == ex['num_objects'].shape == (128,)
  assert len(ex['captions']) == len(ex['hard_negative']) == len(ex['questions']) == 128
  assert isinstance(ex['captions'][0][0], str)
  few = pipeline.eval_examples(small_data_cfg, 'test_novel', max_examples=10)
  np.testing.assert_array_equal(few['image'], ex['image'][:10])
  images = (np.arange(6, dtype=np.uint8) * 51).reshape(1, 1, 2, 3)
  np.testing.assert_allclose(pipeline.normalize_images(images, small_data_cfg).ravel(),
                             [-1.0, -0.6, -0.2, 0.2, 0.6, 1.0], atol=1e-6)


def test_unknown_split_lists_the_splits(small_data_cfg):
  with pytest.raises(ValueError, match="'tset'.*'train', 'validation', 'test', 'test_novel'"):
    pipeline.eval_examples(small_data_cfg, 'tset')


def test_unknown_dataset_config_and_size(small_data_cfg):
  bad = small_data_cfg.copy_and_resolve_references()
  bad.name = 'shapez'
  with pytest.raises(ValueError, match=r"'shapez'.*\['shapes'\]"):
    datasets.get_builder(bad)
  bad = small_data_cfg.copy_and_resolve_references()
  bad.builder_config = '48px'
  with pytest.raises(ValueError, match="'48px'.*'32px'"):
    datasets.get_builder(bad)
  small_data_cfg.image_size = 64
  with pytest.raises(ValueError, match='image_size=32'):
    pipeline.eval_examples(small_data_cfg, 'test')


def test_unwritable_data_dir(small_data_cfg, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  small_data_cfg.data_dir = str(blocker / 'tfds')
  with pytest.raises(OSError, match='not a directory.*--config.data.data_dir'):
    datasets.ensure_built(small_data_cfg)
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    small_data_cfg.data_dir = str(locked)
    with pytest.raises(OSError, match='not writable.*--config.data.data_dir'):
      datasets.ensure_built(small_data_cfg)


def test_ensure_built_reuses_the_build(small_data_cfg):
  info = datasets.ensure_built(small_data_cfg)  # already built by the session fixture
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      'train': 512, 'validation': 128, 'test': 128, 'test_novel': 128}


def test_normalize_images_against_the_per_channel_formula(small_data_cfg):
  images = np.random.RandomState(0).randint(0, 256, (2, 5, 7, 3)).astype(np.uint8)
  std = np.asarray(small_data_cfg.std, np.float32)
  want = (images / 255.0 - np.asarray(small_data_cfg.mean)) / std
  for batch in (images, images[0], images[0, 0, 0]):  # [B, S, S, 3], [S, S, 3], [3]
    got = pipeline.normalize_images(batch, small_data_cfg)
    assert got.dtype == np.float32 and got.shape == batch.shape
    np.testing.assert_allclose(got, want[(0,) * (4 - batch.ndim)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n,b,seed', [(10, 4, 3), (7, 3, 2**32 - 2), (1000, 64, 12345)])
def test_example_ids_follow_grains_shuffled_repeated_batches(n, b, seed):
  """The stream's order is that of grain's range().shuffle().repeat().batch(), epochs
  crossed inside a batch included."""
  import grain  # pylint: disable=g-import-not-at-top
  reference = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(b)
  for index in (0, 1, 2, 5, 15, 16, 17, 40):
    ids = pipeline._example_ids(index, batch_size=b, num_examples=n, shuffle_seed=seed)
    np.testing.assert_array_equal(ids, reference[index])
