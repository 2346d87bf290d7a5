"""Compiled temp memory of the train step by `model.remat` and `model.scan_layers`.

Compiles only (nothing runs), on one device: the CLIP `tiny` config at depth 12 in both
towers, width 64 (4 heads, MLP 256), 32 px images in patches of 8, text length 16.

  python experiments/remat_memory.py [--batch 64] [--depth 12] [--width 64]
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp

from vlm_jax import cli
from vlm_jax.training import partitioning, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deep_config(depth: int, width: int, batch: int, remat: str, scan: bool, dtype='float32'):
  """The `tiny` CLIP config made `depth` layers deep and `width` wide."""
  path = os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny'
  config = cli._load_config_file(path)  # pylint: disable=protected-access
  config.model.text.vocab_size = 64
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = width, depth, 4, 4 * width
  config.model.update(dict(remat=remat, scan_layers=scan, dtype=dtype))
  config.train.batch_size = batch
  return config


def step_temp_bytes(config) -> int:
  """Temp bytes of the compiled train step of `config` on one device."""
  mesh = partitioning.make_mesh(config.parallel, jax.devices()[:1])
  setup = trainer.Setup(config, mesh=mesh)
  size, length, batch = config.data.image_size, config.data.max_text_len, config.train.batch_size
  shapes = {'image': ((batch, size, size, 3), jnp.float32),
            'text_ids': ((batch, length), jnp.int32), 'text_mask': ((batch, length), bool)}
  abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=setup.batch_sharding)
                    for k, (s, d) in shapes.items()}
  with jax.set_mesh(setup.mesh):
    lowered = setup.train_step.lower(setup.abstract_state, abstract_batch, jax.random.key(0))
  return lowered.compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--depth', type=int, default=12)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  print(f'depth {args.depth}, width {args.width}, batch {args.batch}, {args.dtype}: '
        'train-step temp memory (MiB), compile seconds')
  for scan in (False, True):
    base = None
    for remat in ('none', 'full', 'dots_saveable'):
      start = time.perf_counter()
      temp = step_temp_bytes(deep_config(args.depth, args.width, args.batch, remat, scan,
                                         args.dtype))
      base = base or temp
      print(f'scan_layers={scan!s:5} remat={remat:13} {temp / 2**20:8.2f} MiB '
            f'({100 * (1 - temp / base):5.1f}% below none) {time.perf_counter() - start:6.1f} s',
            flush=True)


if __name__ == '__main__':
  main()
