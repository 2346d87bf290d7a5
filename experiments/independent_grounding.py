"""An independent ALBEF-like model (plain flax layers, none of vlm_jax's) trained with masked
place words on `shapes` batches from vlm_jax's pipeline: does a fused model ground words on
this data, and which captions teach it?

  python -m experiments.independent_grounding --phases=one:300,relation:1200 [--patch=8]

Each phase NAME:STEPS trains on rows of batches of 1,024 whose captions are of one kind, 64
rows a step, place words (left, right, top, bottom, above, below) replaced by [MASK] and
predicted through a vocabulary head: 'one' = one-object captions naming a place ('a red
circle on the left'), 'absolute' = two-object captions placing each object ('... on the left
and a blue square on the right'), 'relation' = two-object captions with a relation ('a red
circle to the left of a blue square'), 'horizontal' = those of them with 'left' or 'right',
'all' = every caption with a place word. Prints the
masked-word loss and accuracy on the step's batch every 100 steps. Model: patch-8 ViT of 2
pre-LN blocks, 2 text blocks, 2 blocks of self- plus cross-attention, width 64; AdamW 1e-3,
50 warmup steps, cosine.
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from vlm_jax import cli
from vlm_jax.data import datasets, pipeline

_PHASES = flags.DEFINE_list('phases', ['one:300', 'relation:1200'], 'NAME:STEPS, in order.')
_PATCH = flags.DEFINE_integer('patch', 8, 'Patch size of the image tower.')
WIDTH, ROWS = 64, 64
PLACES = ('left', 'right', 'top', 'bottom', 'above', 'below')


class Block(nn.Module):
  cross: bool

  @nn.compact
  def __call__(self, x, image=None, mask=None):
    x = x + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(x), mask=mask)
    if self.cross:
      x = x + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(x), image)
    return x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(nn.LayerNorm()(x))))


class Model(nn.Module):
  vocab_size: int
  patch: int

  @nn.compact
  def __call__(self, images, ids, text_mask):  # [B, S, S, 3], [B, L], [B, L] -> [B, L, V]
    p = self.patch
    x = nn.Conv(WIDTH, (p, p), (p, p))(images).reshape(images.shape[0], -1, WIDTH)
    x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(2):
      x = Block(False)(x)
    image = nn.LayerNorm()(x)
    t = nn.Embed(self.vocab_size, WIDTH)(ids)
    t = t + self.param('text_pos', nn.initializers.normal(0.02), t.shape[1:])
    mask = text_mask[:, None, None, :]
    for _ in range(2):
      t = Block(False)(t, mask=mask)
    for _ in range(2):
      t = Block(True)(t, image, mask=mask)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(t))


def rows_of_kind(kind: str, ids: np.ndarray, word: dict[str, int], places: np.ndarray):
  """Indices of the rows of token ids [B, L] whose caption is of `kind`."""
  has = lambda w: (ids == word[w]).any(1)
  place = np.isin(ids, places).any(1)
  absolute = has('on') | has('in') | has('at')
  relation = place & ~absolute & ~has('and')
  return np.flatnonzero({'one': place & absolute & ~has('and'),
                         'absolute': place & has('and'),
                         'relation': relation,
                         'horizontal': relation & (has('left') | has('right')),
                         'all': place}[kind])


def main(argv):
  del argv
  from configs import albef_shapes  # pylint: disable=g-import-not-at-top
  config = albef_shapes.get_config()
  tok = datasets.load_tokenizer(config.data)
  stream = pipeline.make_train_dataset(config.data, tok, 1024, seed=0)
  places = np.asarray(tok.word_ids(PLACES)[0])
  names = ('on', 'in', 'at', 'and', 'left', 'right')
  word = dict(zip(names, tok.word_ids(list(names))[0]))
  model = Model(tok.vocab_size, _PATCH.value)
  phases = [(name, int(steps)) for name, steps in (p.split(':') for p in _PHASES.value)]
  total = sum(steps for _, steps in phases)
  batch = stream[0]
  params = model.init(jax.random.key(0), batch['image'][:2], batch['text_ids'][:2],
                      batch['text_mask'][:2])
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, total), weight_decay=0.1)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, ids, text_mask):
    targets = jnp.isin(ids, places) & text_mask
    def loss_fn(p):
      logits = model.apply(p, images, jnp.where(targets, tok.mask_id, ids), text_mask)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
      count = jnp.maximum(targets.sum(), 1)
      return (nll * targets).sum() / count, ((logits.argmax(-1) == ids) * targets).sum() / count
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  start, i = time.time(), 0
  for name, steps in phases:
    for k in range(steps):
      batch = stream[i]
      rows = rows_of_kind(name, batch['text_ids'], word, places)
      rows = np.resize(rows, ROWS)  # repeats rows when fewer than 64 are of the kind
      params, opt_state, loss, accuracy = step(
          params, opt_state, *(batch[key][rows] for key in ('image', 'text_ids', 'text_mask')))
      if k % 100 == 0 or k == steps - 1:
        print(f'{name} step {i}: masked place-word loss {float(loss):.3f}, accuracy '
              f'{float(accuracy):.3f} ({time.time() - start:.0f} s)', flush=True)
      i += 1


if __name__ == '__main__':
  cli.run(main)
