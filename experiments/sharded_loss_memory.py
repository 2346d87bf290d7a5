"""Compiled temp memory per device of the sigmoid loss (value + grad): dense vs chunked ring.

Compiles only (nothing runs), on 8 fake CPU devices with the batch over a (data=8) mesh:
  dense:    `sigmoid_contrastive` on the global [B, E] embeddings, partitioned by XLA;
  ring c=b: `sigmoid_contrastive_chunked` in `jax.shard_map` (loss.sharded=True) scoring
            each ring step's [b, b] chunk in one block (block_size >= b);
  ring c=K: the same in [b, K] column blocks (K = --block-size, `loss.block_size`).
At a fixed device count the dense loss and the one-block ring grow quadratically with B
(x4 per doubling, up to the linear terms), the blocked ring linearly (x2).

  python experiments/sharded_loss_memory.py [--dim 128] [--batches 4096 8192 16384]
"""
import argparse
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.defaults import base_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.training import objectives, partitioning  # pylint: disable=g-import-not-at-top,wrong-import-position


def temp_bytes(fn, mesh, batch: int, dim: int) -> int:
  """Temp bytes of the per-device program of value_and_grad(fn) on [B, E] inputs."""
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  grad = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)
  with jax.set_mesh(mesh):
    compiled = jax.jit(grad).lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--batches', type=int, nargs='+', default=[4096, 8192, 16384])
  parser.add_argument('--block-size', type=int, default=base_config().loss.block_size)
  args = parser.parse_args()
  mesh = partitioning.make_mesh(base_config().parallel)  # (data=all devices)
  n = mesh.shape['data']
  ring = lambda block_size: objectives.shard_mapped_contrastive(
      'sigmoid', mesh, 'data', block_size=block_size)
  print(f'{n} devices, E={args.dim}; temp memory per device (MiB) of value_and_grad; '
        f'x: ratio to the previous row')
  columns = ('dense', 'ring c=b', f'ring c={args.block_size}')
  print(f'{"B":>6} {"b":>5} ' + ' '.join(f'{c:>16}' for c in columns)
        + f' {"[b,B] f32":>10} {"[b,b] f32":>10} {"[B,E] f32":>10}')
  previous = None
  for batch in args.batches:
    b = batch // n
    fns = (losses.sigmoid_contrastive, ring(b), ring(args.block_size))
    temp = [temp_bytes(fn, mesh, batch, args.dim) / 2**20 for fn in fns]
    ratios = [t / p for t, p in zip(temp, previous)] if previous else [None] * len(temp)
    cells = [f'{t:9.2f}' + (f' (x{r:.2f})' if r else ' ' * 7) for t, r in zip(temp, ratios)]
    print(f'{batch:>6} {b:>5} ' + ' '.join(cells)
          + f' {4 * b * batch / 2**20:>10.2f} {4 * b * b / 2**20:>10.2f}'
          f' {4 * batch * args.dim / 2**20:>10.2f}')
    previous = temp


if __name__ == '__main__':
  main()
