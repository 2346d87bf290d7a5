"""Scenes of the `shapes` dataset: what is in them, and how they are drawn.

A scene holds one or two objects; each is a shape with a colour, a size and a position.
Positions and radii are fractions of the image side, so the same scene can be drawn at any
resolution. Everything random comes from the `np.random.Generator` passed in, so a scene is a
pure function of its seed.
"""
import dataclasses

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    'red': (225, 35, 35),
    'green': (40, 190, 50),
    'blue': (45, 85, 240),
    'yellow': (240, 225, 40),
    'purple': (155, 55, 215),
    'orange': (250, 140, 20),
    'white': (240, 240, 240),
    'cyan': (30, 220, 225),
}
SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond')
SIZES = ('small', 'large')
RELATIONS = ('left', 'right', 'above', 'below')

# (colour, shape) pairs in label order; the class name of a pair is 'colour shape'.
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
CLASS_NAMES: tuple[str, ...] = tuple(f'{c} {s}' for c, s in PAIRS)
# One pair per colour, shapes spread over the five: never seen outside split `test_novel`.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLORS))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in PAIRS if p not in HELD_OUT_PAIRS)

_RADIUS = {'small': 0.135, 'large': 0.22}  # half the object's extent, as a fraction of the side
_RADIUS_JITTER = 0.05
_MARGIN = 0.01  # between an object and the image border
_GAP = 0.04     # at least this much between the two objects along their relation's axis
_COLOR_JITTER = 12.0
_BACKGROUND_MAX = 45.0
_PIXEL_NOISE = 7.0


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object. `x`, `y` (centre, y down) and `radius` are fractions of the image side."""
  shape: str
  color: str
  size: str
  x: float
  y: float
  radius: float

  @property
  def name(self) -> str:
    return f'{self.color} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Scene:
  """One or two objects; `relation` says where objects[0] is relative to objects[1].

  `relation` is one of RELATIONS for two-object scenes and '' for one-object scenes.
  """
  objects: tuple[Obj, ...]
  relation: str = ''


def _radius(rng: np.random.Generator, size: str) -> float:
  return _RADIUS[size] * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)


def _separated(rng: np.random.Generator, r0: float, r1: float) -> tuple[float, float]:
  """Positions of two objects of radii r0, r1 along one axis, at least _GAP apart."""
  zero_first = rng.random() < 0.5
  r_first, r_second = (r0, r1) if zero_first else (r1, r0)
  need = r_first + r_second + _GAP
  lo, hi = r_first + _MARGIN, 1 - r_second - _MARGIN
  assert hi - need >= lo, (r0, r1)
  first = rng.uniform(lo, hi - need)
  second = rng.uniform(first + need, hi)
  return (first, second) if zero_first else (second, first)


def _near(rng: np.random.Generator, b0: float, r1: float, limit: float) -> float:
  """A position for the second object across the relation's axis, within `limit` of b0."""
  lo, hi = max(r1 + _MARGIN, b0 - limit), min(1 - r1 - _MARGIN, b0 + limit)
  return rng.uniform(lo, hi)


def sample_scene(rng: np.random.Generator, novel: bool) -> Scene:
  """Draws a scene: one object (half the time) or two with a clear spatial relation.

  Args:
    rng: the only source of randomness.
    novel: if True, the first object is a held-out pair and the second any pair; otherwise
      both are seen pairs. Two objects never share a colour or a shape, so that questions
      such as "what color is the circle?" have one answer.
  """
  first_pool = HELD_OUT_PAIRS if novel else SEEN_PAIRS
  c0, s0 = first_pool[rng.integers(len(first_pool))]
  size0 = SIZES[rng.integers(2)]
  r0 = _radius(rng, size0)
  if rng.random() < 0.5:
    x, y = rng.uniform(r0 + _MARGIN, 1 - r0 - _MARGIN, size=2)
    return Scene((Obj(s0, c0, size0, float(x), float(y), r0),))
  second_pool = [(c, s) for c, s in (PAIRS if novel else SEEN_PAIRS) if c != c0 and s != s0]
  c1, s1 = second_pool[rng.integers(len(second_pool))]
  size1 = SIZES[rng.integers(2)]
  r1 = _radius(rng, size1)
  horizontal = rng.random() < 0.5
  a0, a1 = _separated(rng, r0, r1)
  b0 = rng.uniform(r0 + _MARGIN, 1 - r0 - _MARGIN)
  b1 = _near(rng, b0, r1, 0.5 * abs(a0 - a1))  # the relation's axis dominates
  if horizontal:
    (x0, x1), (y0, y1) = (a0, a1), (b0, b1)
    relation = 'left' if x0 < x1 else 'right'
  else:
    (x0, x1), (y0, y1) = (b0, b1), (a0, a1)
    relation = 'above' if y0 < y1 else 'below'
  return Scene((Obj(s0, c0, size0, float(x0), float(y0), r0),
                Obj(s1, c1, size1, float(x1), float(y1), r1)), relation)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether points (u, v), in units of the object's radius from its centre, are inside."""
  au, av = np.abs(u), np.abs(v)
  if shape == 'circle':
    return u * u + v * v <= 1.0
  if shape == 'square':
    return np.maximum(au, av) <= 0.85
  if shape == 'diamond':
    return au + av <= 1.08
  if shape == 'triangle':  # apex up
    return (v >= -1.0) & (v <= 0.8) & (au <= 1.05 * (v + 1.0) / 1.8)
  if shape == 'cross':
    return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
  raise ValueError(f'Unknown shape {shape!r}; accepted: {SHAPES}.')


def _paint(image: np.ndarray, obj: Obj, color: np.ndarray, supersample: int) -> None:
  """Blends `obj` into `image` [S, S, 3] float32 in place, anti-aliased by supersampling."""
  side = image.shape[0]
  cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
  x0, x1 = max(0, int(cx - 1.1 * r)), min(side, int(np.ceil(cx + 1.1 * r)) + 1)
  y0, y1 = max(0, int(cy - 1.1 * r)), min(side, int(np.ceil(cy + 1.1 * r)) + 1)
  ss = supersample
  u = ((np.arange(x0 * ss, x1 * ss) + 0.5) / ss - cx) / r
  v = ((np.arange(y0 * ss, y1 * ss) + 0.5) / ss - cy) / r
  inside = shape_mask(obj.shape, u[None, :], v[:, None])  # [h * ss, w * ss]
  alpha = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]  # [h, w, 1]
  region = image[y0:y1, x0:x1]
  image[y0:y1, x0:x1] = region * (1 - alpha) + color * alpha


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Draws `scene` on a noisy dark background; returns uint8 [S, S, 3]."""
  supersample = 4 if image_size <= 32 else 2
  image = np.empty((image_size, image_size, 3), np.float32)
  image[:] = rng.uniform(0, _BACKGROUND_MAX, size=3)
  for obj in scene.objects:
    color = np.asarray(COLORS[obj.color], np.float32) + rng.normal(0, _COLOR_JITTER, size=3)
    _paint(image, obj, color, supersample)
  image += rng.normal(0, _PIXEL_NOISE, size=image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)
