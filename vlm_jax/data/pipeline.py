"""Input pipelines: the sharded, resumable train stream and whole evaluation splits.

The train stream is a pure function of (seed, step): element j of the infinite stream is
example `shuffle_epoch(j // N)[j % N]` of the N train examples, with a caption and a flip
chosen from a hash of (seed, j). Global batch k holds elements [k * G, (k + 1) * G); process p
of P reads the p-th of its P equal slices, so the processes together see exactly the batch a
single process would, and the iterator's state is just the next step.
"""
import functools
import re
import sys
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from vlm_jax.data import caption_lengths
from vlm_jax.data import datasets
from vlm_jax.data import records
from vlm_jax.data import shapes_text
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data import vqa

Batch = dict[str, np.ndarray]
_MASK64 = (1 << 64) - 1
_SHUFFLE_STREAM = 1 << 62  # an index the stream itself never reaches


def normalize_images(images: np.ndarray, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, per channel."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[-1:] != (3,):
    raise ValueError(f'normalize_images takes uint8 [..., 3] images, got {images.dtype} '
                     f'{images.shape}.')
  std = np.asarray(data_cfg.std, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(data_cfg.mean, np.float32) / std
  # Per-channel constants tiled along whole rows [..., W * 3]: numpy's inner loop then runs
  # over a row, not over 3 channels (3x faster on 32 px batches).
  width = images.shape[-2] if images.ndim > 1 else 1
  rows = images.reshape(images.shape[:-2] + (width * 3,))
  out = rows.astype(np.float32)
  out *= np.tile(scale, width)
  out += np.tile(offset, width)
  return out.reshape(images.shape)


def _hash(seed: int, index: int) -> int:
  """A well-mixed 64-bit hash of (seed, index) (splitmix64 finaliser)."""
  x = (seed * 0x9E3779B97F4A7C15 + index + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def _example_ids(batch_index: int, *, batch_size: int, num_examples: int,
                 shuffle_seed: int) -> np.ndarray:
  """The example indices [b] of batch `batch_index` of the train stream.

  Element j = batch_index * b + r of the stream is example `index_shuffle(j mod n)` of epoch
  j // n with seed `shuffle_seed + epoch`: the order of grain's
  `MapDataset.range(n).shuffle(shuffle_seed).repeat().batch(b)`, computed without its
  per-element dataset calls (which cost about 20 us per example).
  """
  n, index_shuffle = num_examples, grain.experimental.index_shuffle
  ids = np.empty(batch_size, np.int64)
  for r in range(batch_size):
    epoch, k = divmod(batch_index * batch_size + r, n)
    # (index, max_index, seed, rounds), positional: keywords cost 1 us more per call.
    ids[r] = index_shuffle(k, n - 1, (shuffle_seed + epoch) % 2**32, 4)
  return ids


def _read_records(source: Sequence[bytes], ids: list[int]) -> list[bytes]:
  """The records `ids` of `source`, in one batched read where the source has one."""
  if hasattr(source, '__getitems__'):
    return source.__getitems__(ids)
  return [source[i] for i in ids]


def simple_example_ids(source: Sequence[bytes], max_objects: int) -> np.ndarray:
  """The indices of the examples of `source` with at most `max_objects` objects (an example
  without `num_objects` counts as one), read in chunks."""
  ids, chunk = [], 4096
  for start in range(0, len(source), chunk):
    index = list(range(start, min(start + chunk, len(source))))
    raw = _read_records(source, index)
    ids += [i for i, features in zip(index, records.parse_each(raw))
            if records.integer(features, 'num_objects', default=1) <= max_objects]
  return np.asarray(ids, np.int64)


def _curriculum_example_ids(batch_index: int, *, batch_size: int, num_examples: int,
                            shuffle_seed: int, steps: int, simple_ids: np.ndarray
                            ) -> np.ndarray:
  """`_example_ids`, but drawn from the shuffled `simple_ids` for batches before `steps`."""
  if batch_index < steps:
    return simple_ids[_example_ids(batch_index, batch_size=batch_size,
                                   num_examples=len(simple_ids), shuffle_seed=shuffle_seed)]
  return _example_ids(batch_index, batch_size=batch_size, num_examples=num_examples,
                      shuffle_seed=shuffle_seed)


def _pick_caption(options: list[str], h: int, words: frozenset[str]) -> str:
  """One of `options` by the hash `h`; with `words`, among those that hold one of them (all
  options when none does)."""
  if words:
    holding = [o for o in options if words.intersection(_WORD.findall(o.lower()))]
    options = holding or options
  return options[h % len(options)]


_WORD = re.compile(r'\w+')


def _read_batch(batch_index: int, example_ids: np.ndarray, *, source: Sequence[bytes],
                seed: int, data_cfg: ml_collections.ConfigDict,
                tokenizer: tokenizer_lib.Tokenizer,
                raw_image_shape: tuple[int, int, int] | None = None,
                curriculum_batches: int = 0, first_caption_batches: int = 0) -> Batch:
  """Reads, augments, normalises and tokenises the b examples of one batch at once.

  `raw_image_shape` is (S, S, 3) when the records hold raw pixels, None for PNG or JPEG.

  Element r of batch `batch_index` is element j = batch_index * b + r of the stream; its
  caption and flip come from a hash of (seed, j), so they change from epoch to epoch. In the
  first `curriculum_batches` batches, captions holding one of `data.curriculum.words` are
  preferred; after them, until batch `first_caption_batches`, each example's first caption
  is taken.
  """
  size = len(example_ids)
  ids = [int(i) for i in example_ids]
  drop_below = int(data_cfg.drop_color_prob * 2.0**64)
  records_ = _read_records(source, ids)
  # The config's fields, read once (a ConfigDict lookup costs about 1 us).
  drop_color, with_negatives, with_vqa, with_labels, flip = (
      data_cfg.drop_color_prob, data_cfg.hard_negatives, data_cfg.vqa, data_cfg.labels,
      data_cfg.flip)
  negative_kinds = tuple(data_cfg.hard_negative_kinds)
  words = (frozenset(w.lower() for w in data_cfg.curriculum.words)
           if batch_index < curriculum_batches else frozenset())
  first_caption = curriculum_batches <= batch_index < first_caption_batches
  encoded, captions, negatives, questions, answers, labels = [], [], [], [], [], []
  flipped = np.zeros(size, bool)
  for r, features in enumerate(records.parse_each(records_)):
    h = _hash(seed, batch_index * size + r)
    options = records.texts(features, 'captions')
    caption = options[0] if first_caption else _pick_caption(options, h, words)
    if drop_color and _hash(seed + 1, batch_index * size + r) < drop_below:
      caption = shapes_text.drop_colors(caption, records.texts(features, 'objects/color'))
    encoded.append(records.encoded_image(features))  # read below, all at once
    negative = (_hard_negative(features, caption, h, negative_kinds) if with_negatives
                else '')
    question, answer = _question_answer(features, h) if with_vqa else ('', '')
    if with_labels:
      one_object = records.integer(features, 'num_objects', default=1) == 1
      labels.append(records.integer(features, 'label') if one_object else -1)
    if flip and h >> 63:
      flipped[r] = True
      caption = shapes_text.flip_caption(caption)
      negative = shapes_text.flip_caption(negative)
      question = shapes_text.flip_caption(question)
    questions.append(question)
    answers.append(answer)
    captions.append(caption)
    negatives.append(negative)
  images = (records.raw_images(encoded, raw_image_shape) if raw_image_shape
            else records.decode_images(encoded))  # [b, S, S, 3] uint8
  images[flipped] = images[flipped, :, ::-1]
  ids, mask = tokenizer.encode_batch(captions, data_cfg.max_text_len)  # [b, L] each
  batch = {'image': normalize_images(images, data_cfg),  # [b, S, S, 3] float32
           'text_ids': ids, 'text_mask': mask}
  if data_cfg.labels:
    batch['label'] = np.asarray(labels, np.int32)  # [b]
  if data_cfg.hard_negatives:
    batch['neg_text_ids'], batch['neg_text_mask'] = tokenizer.encode_batch(
        negatives, data_cfg.max_text_len)
    batch['neg_valid'] = np.asarray([bool(n) for n in negatives])  # [b]
  if data_cfg.vqa:
    batch['vqa_ids'], batch['vqa_mask'], batch['vqa_loss_mask'] = vqa.vqa_sequences(
        tokenizer, questions, answers, data_cfg.max_text_len)
  return batch


def _question_answer(features: records.Features, h: int) -> tuple[str, str]:
  """One of the example's (question, answer) pairs, picked by bits 16+ of its hash."""
  questions = records.texts(features, 'questions')
  answers = records.texts(features, 'answers')
  if not questions or len(questions) != len(answers):
    raise ValueError(f'data.vqa needs examples with questions and as many answers; got '
                     f'{len(questions)} questions and {len(answers)} answers.')
  index = (h >> 16) % len(questions)
  return questions[index], answers[index]


HARD_NEGATIVE_KINDS = ('relation', 'attribute', 'position')


def check_hard_negative_kinds(kinds) -> tuple[str, ...]:
  """`data.hard_negative_kinds` as a tuple, or ValueError naming the accepted kinds."""
  kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
  unknown = [k for k in kinds if k not in HARD_NEGATIVE_KINDS]
  if unknown or not kinds:
    raise ValueError(f'data.hard_negative_kinds={kinds!r}: give one or more of '
                     f'{HARD_NEGATIVE_KINDS}.')
  return kinds


def _hard_negative(features: records.Features, caption: str, h: int,
                   kinds: tuple[str, ...] = ('relation', 'attribute')) -> str:
  """A false version of `caption`: its two objects exchanged ('relation'), their colours
  exchanged ('attribute') or its position words mirrored ('position', one-object scenes
  too), of the `kinds` asked for, picked by the example's hash (bit 62 between two) among
  those that are surely false; '' when there is none (a caption that every swap asked for
  could leave true or leaves unchanged).

  The negative is made from the caption itself, not from a canonical one, so that the
  pair differs only in the swap: otherwise a matching head can tell the two apart by their
  wording alone.
  """
  colors = records.texts(features, 'objects/color')
  shapes = records.texts(features, 'objects/shape')
  swaps = {'relation': shapes_text.swap_objects, 'attribute': shapes_text.swap_colors,
           'position': shapes_text.mirror_positions}
  options = [n for n in (swaps[k](caption, colors, shapes) for k in kinds) if n]
  if not options:
    return ''
  if len(options) == 2:
    return options[(h >> 62) & 1]
  return options[(h >> 32) % len(options)]


def make_train_dataset(data_cfg: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                       global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """The infinite, shuffled train stream of this process's batches.

  Batches are dicts: `image` float32 [b, S, S, 3] (normalised), `text_ids` int32 [b, L] and
  `text_mask` bool [b, L], with b = global_batch_size // process_count, L = max_text_len;
  with `data.hard_negatives` also `neg_text_ids` [b, L], `neg_text_mask` [b, L] and
  `neg_valid` bool [b] (a false caption of the same image, see `_hard_negative`); with
  `data.labels` also `label` int32 [b] (the class of one-object images, -1 for others); with
  `data.vqa` also `vqa_ids`, `vqa_mask`, `vqa_loss_mask` [b, L] (one of the image's questions
  with its answer, `[BOS] question answer [EOS]`, loss on the answer and EOS; see
  `vlm_jax.data.vqa`). With `data.curriculum.steps` > 0, the batches of the first steps hold
  only examples with at most `data.curriculum.max_objects` objects (`simple_example_ids`,
  shuffled by the same rule) and prefer captions with one of `data.curriculum.words`; then,
  until step `data.curriculum.first_caption_steps`, every example gives its first caption;
  later batches are those of the plain stream.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'The global batch size ({global_batch_size}) must be positive and '
                     f'divisible by the number of processes ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  data_cfg = data_cfg.copy_and_resolve_references()  # later edits must not change the stream
  check_hard_negative_kinds(data_cfg.hard_negative_kinds)
  if not 0 <= data_cfg.drop_color_prob <= 1 or (data_cfg.drop_color_prob
                                                 and data_cfg.name != 'shapes'):
    raise ValueError(f'data.drop_color_prob={data_cfg.drop_color_prob} must be in [0, 1], '
                     f'and above 0 only for data.name=\'shapes\' (its objects\' colours are '
                     f'known); data.name is {data_cfg.name!r}.')
  datasets.image_size(data_cfg)  # checks data.image_size
  source = datasets.data_source(data_cfg, data_cfg.train_split, raw=True)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {data_cfg.train_split!r} is empty.')
  if process_index == 0:
    caption_lengths.warn_truncated(source, tokenizer, data_cfg.max_text_len)
  seed = int(seed) % 2**32
  # grain reshuffles epoch e with seed + e: hash the seed so that runs with seeds s and s + 1
  # do not share their epoch orders.
  shuffle_seed = _hash(seed, _SHUFFLE_STREAM) % 2**32
  batch_size = global_batch_size // process_count
  # Batch index -> its [b] example indices; reshuffled every epoch.
  example_ids = functools.partial(_example_ids, batch_size=batch_size,
                                  num_examples=len(source), shuffle_seed=shuffle_seed)
  curriculum = data_cfg.curriculum
  curriculum_batches = max(curriculum.steps, 0) * process_count  # per-process batches
  if curriculum_batches:
    simple_ids = simple_example_ids(source, curriculum.max_objects)
    if not len(simple_ids):
      raise ValueError(f'data.curriculum.steps={curriculum.steps}, but no train example has at '
                       f'most data.curriculum.max_objects={curriculum.max_objects} objects.')
    example_ids = functools.partial(
        _curriculum_example_ids, batch_size=batch_size, num_examples=len(source),
        shuffle_seed=shuffle_seed, steps=curriculum_batches, simple_ids=simple_ids)
  ds = grain.MapDataset.range(sys.maxsize // batch_size).map(example_ids)
  ds = ds.map_with_index(functools.partial(
      _read_batch, source=source, seed=seed, data_cfg=data_cfg, tokenizer=tokenizer,
      raw_image_shape=datasets.raw_image_shape(data_cfg),
      curriculum_batches=curriculum_batches,
      first_caption_batches=max(curriculum.first_caption_steps, 0) * process_count))
  return ds[process_index::process_count]


def make_train_iterator(data_cfg: ml_collections.ConfigDict,
                        tokenizer: tokenizer_lib.Tokenizer, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """An iterator over `make_train_dataset`, prefetching with `data.num_threads` threads.

  `get_state()` is a small JSON-serialisable dict; `set_state(state)` resumes exactly: the
  following batches equal those an uninterrupted iterator would have given.
  """
  ds = make_train_dataset(data_cfg, tokenizer, global_batch_size, seed, process_index,
                          process_count)
  options = grain.ReadOptions(num_threads=data_cfg.num_threads,
                              prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(options))


def _texts(values: Sequence[bytes]) -> list[str]:
  return [v.decode('utf-8') for v in values]


def eval_examples(data_cfg: ml_collections.ConfigDict, split: str,
                  max_examples: int = 0) -> dict[str, Any]:
  """The first `max_examples` (0 = all) examples of `split`, in the source's fixed order.

  Returns:
    `image` float32 [N, S, S, 3] (normalised), `label` int32 [N], `num_objects` int32 [N],
    `captions`, `questions`, `answers` (list of N lists of str), `hard_negative` (list of N
    str, '' for one-object scenes), `objects` (list of N lists of dicts with keys shape,
    color, size, x, y). Datasets without scenes (image_text_folder) give 1 object, no
    questions, answers, objects or hard negatives, and label -1 for unlabelled images.
  """
  datasets.image_size(data_cfg)
  source = datasets.data_source(data_cfg, split)
  n = len(source) if max_examples <= 0 else min(max_examples, len(source))
  examples = [source[i] for i in range(n)]
  objects = []
  for ex in examples:
    obj = ex.get('objects', {k: () for k in ('shape', 'color', 'size', 'x', 'y')})
    objects.append([{'shape': s.decode(), 'color': c.decode(), 'size': z.decode(),
                     'x': float(x), 'y': float(y)}
                    for s, c, z, x, y in zip(obj['shape'], obj['color'], obj['size'],
                                             obj['x'], obj['y'])])
  images = np.stack([ex['image'] for ex in examples]) if examples else np.zeros(
      (0, data_cfg.image_size, data_cfg.image_size, 3), np.uint8)
  return {
      'image': normalize_images(images, data_cfg),
      'label': np.asarray([ex['label'] for ex in examples], np.int32),
      'num_objects': np.asarray([ex.get('num_objects', 1) for ex in examples], np.int32),
      'captions': [_texts(ex['captions']) for ex in examples],
      'questions': [_texts(ex.get('questions', ())) for ex in examples],
      'answers': [_texts(ex.get('answers', ())) for ex in examples],
      'hard_negative': [ex.get('hard_negative', b'').decode('utf-8') for ex in examples],
      'objects': objects,
  }
