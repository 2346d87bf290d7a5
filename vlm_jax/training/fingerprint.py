"""A checksum of a tree of arrays, to catch checkpoint files whose bytes changed after saving.

Orbax notices missing and truncated files and damaged index nodes, but restores array data
whose bytes were altered (a flipped bit, a partial overwrite) without complaint. The
checkpointer stores this fingerprint with each checkpoint and compares it after restoring.

Each leaf's raw bits, as uint32 words w_i, give sum_i w_i * (2 i + 1) mod 2^32, and the
leaves' values are combined the same way, weighted by their position in the tree. Integer
arithmetic makes it exact whatever the reduction order or sharding (the same on every
backend); any single flipped bit changes it (the weights are odd).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector (64-bit values give two words)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _weighted_sum(words: jax.Array) -> jax.Array:
  weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
  return jnp.sum(words * weights, dtype=jnp.uint32)


def _fingerprint(tree: Any) -> jax.Array:
  sums = [_weighted_sum(_words(x)) for x in jax.tree.leaves(tree)]
  return _weighted_sum(jnp.stack(sums)) if sums else jnp.zeros((), jnp.uint32)


def fingerprint(tree: Any) -> int:
  """The tree's checksum, an int in [0, 2^32), computed where its arrays are (one small
  program; global arrays of several processes give every process the same value)."""
  leaves = jax.tree.leaves(tree)
  sharding = getattr(leaves[0], 'sharding', None) if leaves else None
  out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
  return int(_compiled(out)(tree))


@functools.lru_cache(maxsize=8)
def _compiled(out_sharding: NamedSharding | None):
  return jax.jit(_fingerprint, out_shardings=out_sharding)
