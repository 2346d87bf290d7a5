"""Does an independent fused model learn which of two objects a caption names first? The
issue's setting, rebuilt on `shapes` scenes: ITM on two-object captions against the same
caption with its objects exchanged, trained together with a masked place word on one-object
scenes, on the model of experiments/independent_grounding.py (plain flax, width 64).

  python -m experiments.independent_binding --steps=1500 --order=left_first --axes=horizontal

Each step trains on 64 one-object captions 'a red circle on the [MASK]' (left/right; with
`--ground_axes=both` also 'a red circle at the [MASK]', top/bottom) and on 64 two-object
scenes, each with its true caption and the caption with its objects exchanged (ITM, 2-way on
the first token). `--order=left_first` names the left (or upper)
object first ('a red circle to the left of a blue square'); `any` also uses the inverse
wording ('a blue square to the right of a red circle'). `--axes=horizontal` keeps left/right
scenes only; `both` adds above/below. `--captions=dataset` uses the scenes' own relational
captions instead (all templates). `--grounding_weight=0` drops the masked place word.
Prints the ITM accuracy on balanced true/false captions of held-out `test` scenes, and at the
end that accuracy for each wording of the test captions.
"""
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from vlm_jax import cli
from vlm_jax.data import datasets, pipeline, shapes_scene, shapes_text

from experiments.independent_grounding import Model  # pylint: disable=g-bad-import-order

_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps.')
_ORDER = flags.DEFINE_enum('order', 'left_first', ['left_first', 'any'], 'Caption order.')
_AXES = flags.DEFINE_enum('axes', 'horizontal', ['horizontal', 'both'], 'Relation axes.')
_CAPTIONS = flags.DEFINE_enum('captions', 'canonical', ['canonical', 'dataset'],
                              'canonical: built as above; dataset: the scenes\' own captions '
                              'that state a relation (every template, axis and order).')
_CANONICAL_STEPS = flags.DEFINE_integer('canonical_steps', 0, 'With --captions=dataset: '
                                        'train on canonical captions (any order, both axes) '
                                        'for this many steps first.')
_GROUNDING = flags.DEFINE_float('grounding_weight', 1.0, 'Weight of the masked place word.')
_GROUND_AXES = flags.DEFINE_enum('ground_axes', 'horizontal', ['horizontal', 'both'],
                                  'Masked place words of one-object scenes: left/right only, '
                                  'or top/bottom too.')
_TRAIN_SCENES = flags.DEFINE_integer('train_scenes', 20000, 'Train scenes read.')
ROWS = 64
_PHRASE = {'left': 'to the left of', 'right': 'to the right of', 'above': 'above',
           'below': 'below'}


def _name(obj):
  return f"{obj['color']} {obj['shape']}"


def dataset_pairs(examples):
  """Rows of two-object scenes, one per own caption that states a relation: (index, true
  caption, the caption with its objects exchanged)."""
  rows = []
  for i, objs in enumerate(examples['objects']):
    colors, shapes = [o['color'] for o in objs], [o['shape'] for o in objs]
    for caption in examples['captions'][i]:
      swapped = shapes_text.swap_objects(caption, colors, shapes)
      if swapped:
        rows.append((i, caption, swapped))
  return rows


def pairs(examples, order: str, axes: str, rng: np.random.Generator,
          captions: str = 'canonical'):
  """Rows of two-object scenes: (index, true caption, exchanged caption)."""
  if captions == 'dataset':
    return dataset_pairs(examples)
  rows = []
  for i, objs in enumerate(examples['objects']):
    if len(objs) != 2:
      continue
    a, b = objs
    horizontal = abs(a['x'] - b['x']) > abs(a['y'] - b['y'])
    if axes == 'horizontal' and not horizontal:
      continue
    first, second = (a, b) if (a['x'] < b['x'] if horizontal else a['y'] < b['y']) else (b, a)
    word = 'left' if horizontal else 'above'
    if order == 'any' and rng.random() < 0.5:
      first, second, word = second, first, {'left': 'right', 'above': 'below'}[word]
    true = f'a {_name(first)} {_PHRASE[word]} a {_name(second)}'
    rows.append((i, true, f'a {_name(second)} {_PHRASE[word]} a {_name(first)}'))
  return rows


_OBJECT = re.compile(r'\b(?:(?:small|large) )?(?:' + '|'.join(shapes_scene.COLORS) + r') (?:'
                     + '|'.join(shapes_scene.SHAPES) + r')\b')
_PLACE = re.compile(r'\b(left|right|top|bottom|above|below)\b')


def wording(caption: str) -> str:
  """The caption's template: 'a red circle to the left of a blue square' -> 'a OBJ to the
  PLACE of a OBJ'."""
  return _PLACE.sub('PLACE', _OBJECT.sub('OBJ', caption))


def grounding_rows(examples, axes: str):
  """Rows of one-object scenes clearly left or right (and, with `axes='both'`, clearly at the
  top or bottom): (index, caption, 0=left/1=right/2=top/3=bottom)."""
  rows = []
  for i, objs in enumerate(examples['objects']):
    if len(objs) != 1:
      continue
    if abs(objs[0]['x'] - 0.5) > 0.1:
      rows.append((i, f'a {_name(objs[0])} on the [MASK]', int(objs[0]['x'] > 0.5)))
    if axes == 'both' and abs(objs[0]['y'] - 0.5) > 0.1:
      rows.append((i, f'a {_name(objs[0])} at the [MASK]', 2 + int(objs[0]['y'] > 0.5)))
  return rows


def main(argv):
  del argv
  from configs import albef_shapes  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  config = albef_shapes.get_config()
  tok = datasets.load_tokenizer(config.data)
  rng = np.random.default_rng(0)
  train = pipeline.eval_examples(config.data, 'train', _TRAIN_SCENES.value)
  test = pipeline.eval_examples(config.data, 'test', 2000)
  train_pairs = pairs(train, _ORDER.value, _AXES.value, rng, _CAPTIONS.value)
  test_pairs = pairs(test, _ORDER.value, _AXES.value, rng, _CAPTIONS.value)
  first_pairs = pairs(train, 'any', 'both', rng) if _CANONICAL_STEPS.value else train_pairs
  ground = grounding_rows(train, _GROUND_AXES.value)
  length = config.data.max_text_len

  def encode(texts):
    ids, mask = tok.encode_batch([t.replace('[MASK]', 'left') for t in texts], length)
    masked = np.array([[t.endswith('[MASK]')] for t in texts]) & (
        np.arange(length)[None] == mask.sum(1, keepdims=True) - 2)  # the word before EOS
    return np.where(masked, tok.mask_id, ids), mask, masked

  class Heads(nn.Module):
    @nn.compact
    def __call__(self, images, ids, mask):  # -> ITM logits [B, 2], place logits [B, L, 2]
      features = Model(tok.vocab_size, 8)(images, ids, mask)  # [B, L, V]
      places = 4 if _GROUND_AXES.value == 'both' else 2
      return nn.Dense(2)(features[:, 0]), nn.Dense(places)(features)

  model = Heads()
  ids, mask, _ = encode(['a red circle on the [MASK]'] * 2)
  params = model.init(jax.random.key(0), train['image'][:2], ids, mask)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, _STEPS.value),
                   weight_decay=0.1)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, g_img, g_ids, g_mask, g_where, g_target, i_img, i_ids, i_mask,
           i_label):
    def loss_fn(p):
      _, place = model.apply(p, g_img, g_ids, g_mask)
      place_nll = optax.softmax_cross_entropy_with_integer_labels(
          place, jnp.broadcast_to(g_target[:, None], g_where.shape))
      grounding = (place_nll * g_where).sum() / g_where.sum()
      itm_logits, _ = model.apply(p, i_img, i_ids, i_mask)
      itm = optax.softmax_cross_entropy_with_integer_labels(itm_logits, i_label).mean()
      return itm + _GROUNDING.value * grounding, (itm, grounding)
    (_, (itm, grounding)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, itm, grounding

  @jax.jit
  def itm_scores(params, images, ids, mask):
    logits, _ = model.apply(params, images, ids, mask)
    return logits[:, 1] - logits[:, 0]

  def correct(params) -> np.ndarray:
    """[2, P]: whether each test pair's true caption is accepted and its false one refused."""
    index = np.array([r[0] for r in test_pairs])
    true_ids, true_mask, _ = encode([r[1] for r in test_pairs])
    false_ids, false_mask, _ = encode([r[2] for r in test_pairs])
    true = itm_scores(params, test['image'][index], true_ids, true_mask)
    false = itm_scores(params, test['image'][index], false_ids, false_mask)
    return np.stack([np.asarray(true) > 0, np.asarray(false) <= 0])

  def evaluate(params):
    return float(correct(params).mean())

  print(f'{len(train_pairs)} train pairs, {len(test_pairs)} test pairs, {len(ground)} '
        f'grounding rows', flush=True)
  start = time.time()
  for k in range(_STEPS.value):
    g = [ground[j] for j in rng.integers(len(ground), size=ROWS)]
    g_ids, g_mask, g_where = encode([r[1] for r in g])
    source = first_pairs if k < _CANONICAL_STEPS.value else train_pairs
    half = [source[j] for j in rng.integers(len(source), size=ROWS // 2)]
    texts = [r[1] for r in half] + [r[2] for r in half]
    i_ids, i_mask, _ = encode(texts)
    i_img = train['image'][np.array([r[0] for r in half] * 2)]
    label = np.array([1] * len(half) + [0] * len(half))
    params, opt_state, itm, grounding = step(
        params, opt_state, train['image'][np.array([r[0] for r in g])], g_ids, g_mask,
        g_where, np.array([r[2] for r in g]), i_img, i_ids, i_mask, label)
    if k % 250 == 0 or k == _STEPS.value - 1:
      print(f'step {k}: itm loss {float(itm):.3f}, place loss {float(grounding):.3f}, '
            f'held-out itm accuracy {evaluate(params):.3f} ({time.time() - start:.0f} s)',
            flush=True)
  by_wording = correct(params).mean(0)  # [P]
  wordings = [wording(r[1]) for r in test_pairs]
  for w in sorted(set(wordings)):
    rows = [i for i, x in enumerate(wordings) if x == w]
    print(f'{by_wording[rows].mean():.3f} on {len(rows):4d} test pairs worded {w!r}')


if __name__ == '__main__':
  cli.run(main)
