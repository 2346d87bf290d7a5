"""The compiled cost of a tower's training step, from XLA's cost analysis."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def tower_train_flops(tower: nn.Module, images: jax.Array, seed: int = 0) -> float:
  """FLOPs of one training-mode forward and backward pass of an image tower on `images`
  [B, H, W, 3] (an array or a ShapeDtypeStruct), from XLA's cost analysis of the compiled
  gradient of a scalar of its outputs, with dropout and patch dropout active
  (`deterministic=False`). Nothing is run or allocated."""
  params = nn.unbox(jax.eval_shape(tower.init, jax.random.key(seed), images))['params']

  def loss(params, images, rng):
    pooled, tokens = tower.apply({'params': params}, images, deterministic=False,
                                 rngs={'dropout': rng})
    return jnp.sum(pooled ** 2) + jnp.sum(tokens ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, images, jax.random.key(seed)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0]
  return float(cost['flops'])
