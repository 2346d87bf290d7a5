"""Gradient caching (Gao et al., 2021, "GradCache"): large contrastive batches in small memory.

Plain gradient accumulation would sum the gradients of k small batches, but a contrastive loss
of a small batch sees only that batch's negatives: it is a different, weaker objective.
Gradient caching computes the loss of the whole batch and its exact gradient in two passes
over k micro-batches:

1. Embed every micro-batch without keeping activations (nothing is differentiated here) and
   join the embeddings: outputs of the whole batch.
2. Take the loss of the whole batch and its gradient with respect to the outputs; this is
   cheap (a [B, E] embedding per tower and a [B, B] logit matrix).
3. Run each micro-batch forward again under `jax.vjp`, pull back its slice of the output
   gradient, and add up the parameter gradients.

Both passes are `lax.scan`s over the micro-batches, so at most one micro-batch's activations
live at a time. The result equals the gradient of one pass over the whole batch (up to float
rounding); the price is one extra forward pass. Micro-batch i uses dropout key i in both passes,
so the second pass recomputes exactly the embeddings the loss saw.

Micro-batch i takes rows i, i + k, i + 2k, ... of the batch: with the batch split over devices
in contiguous blocks, every micro-batch is then split over all devices without moving data.
"""
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax.losses.sharded import AxisName
from vlm_jax.training import objectives

# `(params, batch, rng) -> ((loss, aux), grads)`, like `jax.value_and_grad(loss_fn, has_aux=True)`.
GradFn = Callable[[Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def split_microbatches(batch: Any, k: int) -> Any:
  """Leaves [B, ...] -> [k, B / k, ...]; micro-batch i holds rows i, i + k, i + 2k, ..."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'A batch of {x.shape[0]} cannot be split into {k} micro-batches '
                       '(train.microbatches); choose a divisor of the batch size.')
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])  # [B / k, k, ...]
    return jnp.swapaxes(x, 0, 1)  # [k, B / k, ...]

  return jax.tree.map(split, batch)


def join_microbatches(stacked: Any) -> Any:
  """The inverse of `split_microbatches` for per-example leaves, [k, b, ...] -> [k * b, ...];
  scalar outputs (stacked to [k], equal for all micro-batches) -> their first value []."""

  def join(x):
    if x.ndim == 1:
      return x[0]
    x = jnp.swapaxes(x, 0, 1)  # [b, k, ...]
    return x.reshape(-1, *x.shape[2:])

  return jax.tree.map(join, stacked)


def _split_cotangents(out_grads: Any, k: int) -> Any:
  """Gradients w.r.t. the whole batch's outputs -> one slice per micro-batch, [k, ...].

  Per-example gradients are split like `split_microbatches`; a scalar output is computed
  alike by every micro-batch, so its gradient goes to micro-batch 0 and zeros to the others.
  """

  def split(g):
    if g.ndim == 0:
      return jnp.zeros((k,), g.dtype).at[0].set(g)
    return split_microbatches(g, k)

  return jax.tree.map(split, out_grads)


def _embed_all(embed_fn: objectives.EmbedFn, params: Any, micro: dict, rngs: jax.Array) -> Any:
  """Pass 1: outputs of the whole batch from k forward passes; no activations are kept."""
  params = jax.lax.stop_gradient(params)

  def body(carry, xs):
    batch, rng = xs
    return carry, embed_fn(params, batch, rng)

  _, stacked = jax.lax.scan(body, None, (micro, rngs))  # leaves [k, b, ...] or [k]
  return join_microbatches(stacked)


def _backprop(embed_fn: objectives.EmbedFn, params: Any, micro: dict, rngs: jax.Array,
              out_grads: Any, k: int) -> Any:
  """Pass 2: the parameter gradient, summed over micro-batches from their output gradients
  (accumulated in at least float32)."""
  accumulate_dtype = lambda p: jnp.promote_types(p.dtype, jnp.float32)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, accumulate_dtype(p)), params)

  def body(total, xs):
    batch, rng, cotangent = xs
    _, pullback = jax.vjp(lambda p: embed_fn(p, batch, rng), params)
    (grads,) = pullback(cotangent)
    return jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads), None

  cotangents = _split_cotangents(out_grads, k)  # leaves [k, b, ...] or [k]
  total, _ = jax.lax.scan(body, zeros, (micro, rngs, cotangents))
  return jax.tree.map(lambda t, p: t.astype(p.dtype), total, params)


def grad_cache(embed_fn: objectives.EmbedFn, outputs_loss_fn: objectives.OutputsLossFn,
               microbatches: int) -> GradFn:
  """The loss and its parameter gradient on the whole batch, by gradient caching.

  Args:
    embed_fn: `(params, batch, rng) -> outputs`; every output is either per example
      ([b, ...]) or a scalar that does not depend on the batch (e.g. logit_scale).
    outputs_loss_fn: `outputs -> (loss, aux)` on the whole batch's outputs.
    microbatches: k; the batch size must be divisible by it.

  Returns:
    `grad_fn(params, batch, rng) -> ((loss, aux), grads)`; micro-batch i gets the dropout key
    `jax.random.split(rng, k)[i]`.
  """
  k = microbatches

  def grad_fn(params, batch, rng):
    micro = split_microbatches(batch, k)  # leaves [k, B / k, ...]
    rngs = jax.random.split(rng, k)
    outputs = _embed_all(embed_fn, params, micro, rngs)
    (loss, aux), out_grads = jax.value_and_grad(outputs_loss_fn, has_aux=True)(outputs)
    grads = _backprop(embed_fn, params, micro, rngs, out_grads, k)
    return (loss, aux), grads

  return grad_fn


def grad_fn_for(model: nn.Module, config: ml_collections.ConfigDict, *,
                mesh: Mesh | None = None, axis_name: AxisName | None = None,
                batch_sharding: jax.sharding.NamedSharding | None = None) -> GradFn | None:
  """The gradient-caching `GradFn` of `config.train.microbatches`, or None when it is 1.

  `mesh` and `axis_name` are those given to `objectives.make_loss_fn`; `batch_sharding`, the
  global batch's, only serves to warn when a device's rows do not split into whole
  micro-batches (correct, but rows then move between devices). As in `make_loss_fn`, the
  frozen parameters are behind `stop_gradient` (`objectives.stop_frozen_fn`).
  """
  k, batch_size = config.train.microbatches, config.train.batch_size
  if k < 1 or batch_size % k:
    raise ValueError(f'train.microbatches={k} must be a positive divisor of '
                     f'train.batch_size={batch_size}.')
  if k == 1:
    return None
  if batch_sharding is not None:
    shards = batch_shards(batch_sharding)
    if batch_size % (shards * k):
      logging.warning('train.microbatches=%d does not divide the %d rows of each of the %d '
                      'batch shards: micro-batches will move between devices.', k,
                      batch_size // shards, shards)
  return grad_cache(objectives.stop_frozen_fn(objectives.make_embed_fn(model), config),
                    objectives.make_outputs_loss_fn(config, mesh=mesh, axis_name=axis_name),
                    k)


def batch_shards(sharding: jax.sharding.NamedSharding) -> int:
  """How many ways `sharding` splits the leading (batch) dimension."""
  n = sharding.mesh.size
  return n // sharding.shard_shape((n,))[0]
