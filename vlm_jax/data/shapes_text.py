"""Text of the `shapes` dataset: captions, hard negatives and question/answer pairs.

Shape and colour words are always the canonical ones (those of the class names), so that
zero-shot prompts built from class names ("a red circle") use the training vocabulary;
variety comes from the templates.
"""
import re

import numpy as np

from vlm_jax.data import shapes_scene

NUM_CAPTIONS = 5

_REL_PHRASE = {'left': 'to the left of', 'right': 'to the right of',
               'above': 'above', 'below': 'below'}
_INVERSE = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}

_ONE_TEMPLATES = (
    'a {size} {color} {shape}',
    'a picture of a {color} {shape}',
    'a photo of a {size} {color} {shape}',
    'there is a {color} {shape} {where}',
    'a {color} {shape} {where}',
    'a {size} {shape} that is {color}',
    'one {color} {shape} on a dark background',
    'a {size} {color} {shape} {where}',
)
_TWO_TEMPLATES = (
    'a {size0} {color0} {shape0} {rel} a {size1} {color1} {shape1}',
    'a picture of a {color0} {shape0} {rel} a {color1} {shape1}',
    'there is a {color0} {shape0} {rel} a {color1} {shape1}',
    'a {color1} {shape1} {inv} a {color0} {shape0}',
    'a {color0} {shape0} and a {color1} {shape1}',
    'two objects: a {color0} {shape0} {rel} a {color1} {shape1}',
    'a {color0} {shape0} {where0} and a {color1} {shape1} {where1}',
)
_SWAP_LR = {'left': 'right', 'right': 'left', 'Left': 'Right', 'Right': 'Left',
            'LEFT': 'RIGHT', 'RIGHT': 'LEFT'}
_LR_WORD = re.compile(r'\b(left|right)\b', re.IGNORECASE)


def flip_caption(text: str) -> str:
  """The caption of the horizontally flipped image: swaps the words 'left' and 'right'.

  Also right for questions: flipping the image and the question keeps the answer.
  """
  return _LR_WORD.sub(lambda m: _SWAP_LR.get(m.group(0), m.group(0)), text)


def where(obj: shapes_scene.Obj) -> str:
  """Where the object is in the image, e.g. 'in the top left', 'on the right'."""
  h = 'left' if obj.x < 0.4 else 'right' if obj.x > 0.6 else ''
  v = 'top' if obj.y < 0.4 else 'bottom' if obj.y > 0.6 else ''
  if h and v:
    return f'in the {v} {h}'
  if h:
    return f'on the {h}'
  if v:
    return f'at the {v}'
  return 'in the middle'


def _fields(scene: shapes_scene.Scene) -> dict[str, str]:
  if len(scene.objects) == 1:
    obj, = scene.objects
    return dict(size=obj.size, color=obj.color, shape=obj.shape, where=where(obj))
  fields = {}
  for i, obj in enumerate(scene.objects):
    fields.update({f'size{i}': obj.size, f'color{i}': obj.color, f'shape{i}': obj.shape,
                   f'where{i}': where(obj)})
  fields.update(rel=_REL_PHRASE[scene.relation], inv=_REL_PHRASE[_INVERSE[scene.relation]])
  return fields


def canonical_caption(scene: shapes_scene.Scene) -> str:
  """'a red circle', or 'a red circle to the left of a blue square'."""
  if len(scene.objects) == 1:
    return f'a {scene.objects[0].name}'
  a, b = scene.objects
  return f'a {a.name} {_REL_PHRASE[scene.relation]} a {b.name}'


def hard_negative(scene: shapes_scene.Scene) -> str:
  """The canonical caption with the two objects exchanged ('' for one-object scenes).

  'a red circle to the left of a blue square' -> 'a blue square to the left of a red circle':
  the same words, the wrong scene.
  """
  if len(scene.objects) == 1:
    return ''
  a, b = scene.objects
  return f'a {b.name} {_REL_PHRASE[scene.relation]} a {a.name}'


def captions(scene: shapes_scene.Scene, rng: np.random.Generator) -> list[str]:
  """NUM_CAPTIONS true captions: the canonical one first, then distinct templates."""
  templates = _ONE_TEMPLATES if len(scene.objects) == 1 else _TWO_TEMPLATES
  chosen = rng.choice(len(templates), size=NUM_CAPTIONS - 1, replace=False)
  fields = _fields(scene)
  return [canonical_caption(scene)] + [templates[i].format(**fields) for i in chosen]


def questions_answers(scene: shapes_scene.Scene,
                      rng: np.random.Generator) -> tuple[list[str], list[str]]:
  """Questions about the scene with one-word answers (colour, shape, size, count, yes/no)."""
  qa = []
  for obj in scene.objects:
    qa += [(f'what color is the {obj.shape}?', obj.color),
           (f'what shape is the {obj.color} object?', obj.shape),
           (f'what size is the {obj.shape}?', obj.size)]
  if len(scene.objects) == 1:
    obj, = scene.objects
    others = [p for p in shapes_scene.PAIRS if p != (obj.color, obj.shape)]
    color, shape = others[rng.integers(len(others))]
    qa += [('how many objects are there?', 'one'),
           (f'is there a {obj.name}?', 'yes'),
           (f'is there a {color} {shape}?', 'no')]
  else:
    a, b = scene.objects
    horizontal = scene.relation in ('left', 'right')
    word = 'left of' if horizontal else 'above'
    truth = scene.relation == ('left' if horizontal else 'above')  # a is left of / above b
    if rng.random() < 0.5:
      a, b, truth = b, a, not truth
    qa += [('how many objects are there?', 'two'),
           (f'is the {a.name} {word} the {b.name}?', 'yes' if truth else 'no')]
  return [q for q, _ in qa], [ans for _, ans in qa]


def attribute_negative(colors: list[str], shapes: list[str], hard_negative_caption: str) -> str:
  """The canonical caption with the two objects' colours exchanged ('' when that changes
  nothing: one object, or both the same colour).

  'a red circle to the left of a blue square' -> 'a blue circle to the left of a red square'.
  The relation phrase is read from the stored relation hard negative
  ('a {color1} {shape1} {rel} a {color0} {shape0}'), so no geometry is recomputed.
  """
  if len(colors) != 2 or colors[0] == colors[1]:
    return ''
  (c0, c1), (s0, s1) = colors, shapes
  head, tail = f'a {c1} {s1} ', f' a {c0} {s0}'
  if not (hard_negative_caption.startswith(head) and hard_negative_caption.endswith(tail)):
    raise ValueError(f'Hard negative {hard_negative_caption!r} does not name the objects '
                     f'{c0} {s0} and {c1} {s1}.')
  relation = hard_negative_caption[len(head):-len(tail)]
  return f'a {c1} {s0} {relation} a {c0} {s1}'


_RELATION_PHRASES = tuple(_REL_PHRASE.values())


def _exchange(text: str, x: str, y: str) -> str:
  """`text` with every whole-word occurrence of `x` and `y` exchanged."""
  pattern = re.compile(rf'\b({re.escape(x)}|{re.escape(y)})\b')
  return pattern.sub(lambda m: y if m.group(0) == x else x, text)


def _relational(caption: str) -> bool:
  return any(f' {phrase} ' in caption for phrase in _RELATION_PHRASES)


def swap_objects(caption: str, colors: list[str], shapes: list[str]) -> str:
  """A two-object caption with its two objects ('red circle', 'blue star') exchanged: false
  for captions stating a relation; '' for others (where it could stay true) and when
  nothing changes.

  'a small red circle above a blue star' -> 'a small blue star above a red circle'.
  """
  if len(colors) != 2 or not _relational(caption):
    return ''
  a, b = f'{colors[0]} {shapes[0]}', f'{colors[1]} {shapes[1]}'
  swapped = _exchange(caption, a, b) if a != b else caption
  return swapped if swapped != caption else ''


def drop_colors(caption: str, colors: list[str]) -> str:
  """The caption without its colour words, still true of the image: 'a small red circle
  above a blue star' -> 'a small circle above a star'; 'a large square that is red' ->
  'a large square'.

  A caption that names a shape but no colour is true of that shape in every colour, which
  ties the shape's image features to the shape alone (augmentation: `data.drop_color_prob`).
  """
  for color in set(colors):
    caption = re.sub(rf' that is {re.escape(color)}\b', '', caption)
    caption = re.sub(rf'\b{re.escape(color)} ', '', caption)
  return caption


_MIRROR = {'left': 'right', 'right': 'left', 'top': 'bottom', 'bottom': 'top',
           'above': 'below', 'below': 'above'}
_POSITION_WORD = re.compile(rf'\b({"|".join(_MIRROR)})\b')


def mirror_positions(caption: str, colors: list[str], shapes: list[str]) -> str:
  """The caption with every position word mirrored (left/right, top/bottom, above/below),
  or '' when it has none. Always false: `where` and the relations name sides strictly
  ('on the left' is x < 0.4, 'on the right' x > 0.6), and one mirrored word suffices.

  'a red circle on the left' -> 'a red circle on the right';
  'a red circle above a blue star' -> 'a red circle below a blue star'.
  One object suffices: this is the grounding a relation needs (where is the object named?)
  without the binding of two objects to two places.
  """
  del colors, shapes  # the same signature as the other swaps
  mirrored = _POSITION_WORD.sub(lambda m: _MIRROR[m.group(0)], caption)
  return mirrored if mirrored != caption else ''


def swap_colors(caption: str, colors: list[str], shapes: list[str]) -> str:
  """A two-object caption with the objects' colours exchanged, or '' when that could leave
  it true (same colours; same shapes without a stated relation) or changes nothing.

  'a red circle and a blue star' -> 'a blue circle and a red star'.
  """
  if len(colors) != 2 or colors[0] == colors[1]:
    return ''
  if shapes[0] == shapes[1] and not _relational(caption):
    return ''
  swapped = _exchange(caption, colors[0], colors[1])
  return swapped if swapped != caption else ''
