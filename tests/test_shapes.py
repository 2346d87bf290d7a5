"""The procedural `shapes` dataset: determinism, held-out pairs, captions, negatives, QA."""
import re

import numpy as np
import pytest

from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.data import shapes

_REL = {'to the left of': 'left', 'to the right of': 'right', 'above': 'above',
        'below': 'below'}


@pytest.fixture(scope='module')
def splits(shapes_small_cfg):
  return {s: pipeline.eval_examples(shapes_small_cfg, s) for s in shapes.SPLITS}


def _all(splits):
  for split, ex in splits.items():
    for i in range(len(ex['label'])):
      yield split, {k: v[i] for k, v in ex.items()}


def test_class_names_and_held_out_pairs(small_data_cfg):
  names = datasets.class_names(small_data_cfg)
  assert names == list(shapes.CLASS_NAMES) and len(names) == 40 and 'red circle' in names
  held_out = shapes.HELD_OUT_PAIRS
  assert len(held_out) == 8
  assert {c for c, _ in held_out} == set(shapes.COLORS)  # one per colour
  assert {s for _, s in held_out} == set(shapes.SHAPES)  # shapes spread
  assert not set(held_out) & set(shapes.SEEN_PAIRS)


def test_drawing_is_deterministic():
  a, b = shapes.draw_example('train', 7, 32), shapes.draw_example('train', 7, 32)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions'] and a['questions'] == b['questions']
  assert not np.array_equal(a['image'], shapes.draw_example('train', 8, 32)['image'])
  big = shapes.draw_example('train', 7, 64)  # same scene at another resolution
  assert big['captions'] == a['captions'] and big['image'].shape == (64, 64, 3)


def test_build_equals_fresh_draws(small_data_cfg, tmp_path):
  cfg = small_data_cfg
  built = pipeline.eval_examples(cfg, 'test')['captions']
  drawn = [shapes.draw_example('test', i, 32)['captions'] for i in range(len(built))]
  assert sorted(built) == sorted(drawn)
  source = datasets.data_source(cfg, 'test')
  built_images = {source[i]['image'].tobytes() for i in range(len(source))}
  assert built_images == {shapes.draw_example('test', i, 32)['image'].tobytes()
                          for i in range(len(source))}
  again = cfg.copy_and_resolve_references()  # a second build gives the same records
  again.data_dir = str(tmp_path)
  datasets.ensure_built(again)
  first, second = (datasets.data_source(c, 'test_novel', raw=True) for c in (cfg, again))
  assert [first[i] for i in range(len(first))] == [second[i] for i in range(len(second))]


def test_novel_pairs_only_in_test_novel(splits):
  seen, held_out = set(shapes.SEEN_PAIRS), set(shapes.HELD_OUT_PAIRS)
  for split, ex in _all(splits):
    pairs = [(o['color'], o['shape']) for o in ex['objects']]
    assert shapes.CLASS_NAMES[ex['label']] == ' '.join(pairs[0])
    assert len(pairs) == ex['num_objects']
    if split == 'test_novel':
      assert pairs[0] in held_out
    else:
      assert set(pairs) <= seen, (split, pairs)
  singles = np.mean(splits['train']['num_objects'] == 1)
  assert 0.35 < singles < 0.65


def test_captions_mention_colour_and_shape(splits):
  for _, ex in _all(splits):
    assert len(ex['captions']) == 5 and len(set(ex['captions'])) == 5
    for caption in ex['captions']:
      for obj in ex['objects']:
        assert obj['color'] in caption.split() and obj['shape'] in caption.split(), caption


def test_hard_negative_swaps_the_objects(splits):
  for _, ex in _all(splits):
    objs = ex['objects']
    if len(objs) == 1:
      assert ex['hard_negative'] == ''
      continue
    a, b = (f"{o['color']} {o['shape']}" for o in objs)
    m = re.fullmatch(f'a {a} (.+) a {b}', ex['captions'][0])
    assert m, ex['captions'][0]
    assert ex['hard_negative'] == f'a {b} {m.group(1)} a {a}'
    rel = _REL[m.group(1)]
    dx, dy = objs[0]['x'] - objs[1]['x'], objs[0]['y'] - objs[1]['y']
    assert {'left': dx < 0, 'right': dx > 0, 'above': dy < 0, 'below': dy > 0}[rel]


def test_questions_have_one_word_true_answers(splits):
  for _, ex in _all(splits):
    assert len(ex['questions']) == len(ex['answers']) > 0
    objs = {o['shape']: o for o in ex['objects']}
    for q, answer in zip(ex['questions'], ex['answers']):
      assert len(answer.split()) == 1
      if q == 'how many objects are there?':
        assert answer == ['one', 'two'][ex['num_objects'] - 1]
      elif m := re.fullmatch(r'what color is the (\w+)\?', q):
        assert objs[m.group(1)]['color'] == answer
      elif m := re.fullmatch(r'is the \w+ (\w+) left of the \w+ (\w+)\?', q):
        left = objs[m.group(1)]['x'] < objs[m.group(2)]['x']
        assert answer == ('yes' if left else 'no')


def test_objects_are_drawn_where_the_metadata_says(splits):
  ex = splits['test']
  images = np.rint((ex['image'] * 0.5 + 0.5) * 255)  # undo the default normalisation
  for image, objs in zip(images, ex['objects']):
    for obj in objs:
      y, x = int(obj['y'] * 32), int(obj['x'] * 32)
      np.testing.assert_allclose(image[y, x], shapes.COLORS[obj['color']], atol=70)


@pytest.mark.parametrize('text,flipped', [
    ('a red circle to the left of a blue square', 'a red circle to the right of a blue square'),
    ('there is a cyan cross on the right', 'there is a cyan cross on the left'),
    ('a white square in the top left', 'a white square in the top right'),
    ('is the red circle left of the blue cross?', 'is the red circle right of the blue cross?'),
    ('a bright red circle above a leftover', 'a bright red circle above a leftover'),
])
def test_flip_caption(text, flipped):
  assert shapes.flip_caption(text) == flipped
  assert shapes.flip_caption(flipped) == text
