"""Objectives as the trainer sees them: `loss_fn(params, batch, rng) -> (loss, aux)`.

The contrastive loss runs in one of three ways:
  * dense (default): the global [B, B] logits under jit, partitioned by XLA;
  * `loss.sharded=True` with a `mesh`: the collective losses of `vlm_jax.losses.sharded`
    inside `jax.shard_map` over the batch mesh axes (the 'batch' rule of `parallel.rules`);
    the loss and its gradients are those of the dense loss, no gradient rescaling needed;
  * `axis_name` given (inside `jax.pmap(..., axis_name=...)`): the collective losses on the
    device's shard; the loss is global and identical on every device, and `lax.pmean` of
    the per-device gradients over `axis_name` is the single-device gradient.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax import losses
from vlm_jax.losses.sharded import AxisName
from vlm_jax.training import partitioning

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
ContrastiveFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def _with_bias(name: str, fn: Callable) -> ContrastiveFn:
  """`fn` as `f(image_emb, text_emb, logit_scale, logit_bias)`; only 'sigmoid' uses the bias."""
  if name == 'sigmoid':
    return fn
  return lambda image_emb, text_emb, logit_scale, logit_bias: fn(image_emb, text_emb,
                                                                 logit_scale)


def _collective(name: str, axis_name: AxisName, block_size: int | None) -> Callable:
  """The collective loss `name` on local shards over `axis_name`; `block_size` (the
  sigmoid ring's widest column block, `loss.block_size`) is passed to 'sigmoid' only, and
  None keeps the loss's default."""
  kwargs = {'axis_name': axis_name}
  if name == 'sigmoid' and block_size is not None:
    kwargs['block_size'] = block_size
  return functools.partial(losses.get_sharded_loss(name), **kwargs)


def contrastive_terms(name: str, outputs: dict, *, axis_name: AxisName | None = None,
                      block_size: int | None = None) -> tuple[jax.Array, dict]:
  """The contrastive loss `name` ('softmax' or 'sigmoid') of dual-encoder outputs.

  With `axis_name`, `outputs` holds local shards and the collective loss is used (with
  `block_size` for the sigmoid ring, see `_collective`).
  """
  if axis_name is None:
    fn = losses.get_loss(name)
  else:
    fn = _collective(name, axis_name, block_size)
  return _with_bias(name, fn)(outputs['image_emb'], outputs['text_emb'],
                              outputs['logit_scale'], outputs['logit_bias'])


def shard_mapped_contrastive(name: str, mesh: Mesh, batch_axes: AxisName, *,
                             block_size: int | None = None) -> ContrastiveFn:
  """The collective loss `name` as a global function of [B, E] embeddings (jit-able).

  Embeddings are split over `batch_axes` of `mesh`; the scalars and outputs replicate.
  `block_size`: the sigmoid ring's widest column block (None: the loss's default).
  """
  local = _with_bias(name, _collective(name, batch_axes, block_size))
  spec = P(batch_axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())


def _batch_axes(parallel_cfg) -> AxisName | None:
  """The mesh axes of the 'batch' rule, or None when the batch is not split."""
  axes = partitioning.batch_spec(parallel_cfg)[0]
  if isinstance(axes, list):
    axes = tuple(axes)
  return axes or None


def _contrastive_fn(config: ml_collections.ConfigDict, mesh: Mesh | None,
                    axis_name: AxisName | None) -> Callable[[dict], tuple[jax.Array, dict]]:
  """Picks the dense, shard_map or pmap form of the contrastive loss (see module doc)."""
  name = config.loss.name
  block_size = config.loss.get('block_size')
  if mesh is not None and axis_name is not None:
    raise ValueError('make_loss_fn: pass `mesh` (jit) or `axis_name` (pmap), not both.')
  if axis_name is not None:
    return lambda outputs: contrastive_terms(name, outputs, axis_name=axis_name,
                                             block_size=block_size)
  batch_axes = _batch_axes(config.parallel)
  if config.loss.sharded and mesh is not None and batch_axes is not None:
    fn = shard_mapped_contrastive(name, mesh, batch_axes, block_size=block_size)
    return lambda outputs: fn(outputs['image_emb'], outputs['text_emb'],
                              outputs['logit_scale'], outputs['logit_bias'])
  return lambda outputs: contrastive_terms(name, outputs)


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict, *,
                 mesh: Mesh | None = None, axis_name: AxisName | None = None) -> LossFn:
  """The training objective of `config.loss` for `model` (a dual encoder for now).

  Args:
    model: the dual encoder.
    config: the full config (reads `loss` and, for the sharded loss, `parallel.rules`).
    mesh: the jit path's mesh; used only when `loss.sharded` is true.
    axis_name: the pmap axis name; the batch passed to `loss_fn` is then the local shard.

  Returns:
    `loss_fn(params, batch, rng) -> (loss [], aux)`; the loss is the global-batch loss.
  """
  name = config.loss.name
  contrastive = _contrastive_fn(config, mesh, axis_name)

  def loss_fn(params, batch, rng):
    outputs = model.apply({'params': params}, batch['image'], batch['text_ids'],
                          batch['text_mask'], deterministic=False, rngs={'dropout': rng})
    loss, metrics = contrastive(outputs)
    aux = {name: loss, 'logit_scale': outputs['logit_scale'],
           'logit_bias': outputs['logit_bias'], **metrics}
    return loss, aux

  return loss_fn


# The two halves of `loss_fn`, for gradient caching (`vlm_jax.training.accumulation`):
# loss_fn(params, batch, rng) == outputs_loss_fn(embed_fn(params, batch, rng)).

EmbedFn = Callable[[Any, dict, jax.Array], dict]
OutputsLossFn = Callable[[dict], tuple[jax.Array, dict]]


def make_embed_fn(model: nn.Module) -> EmbedFn:
  """`embed_fn(params, batch, rng) -> outputs`: the training-mode forward pass of `model`.

  For the dual encoder: image_emb [B, E], text_emb [B, E], logit_scale [], logit_bias [];
  `rng` is the dropout key.
  """

  def embed_fn(params, batch, rng):
    return model.apply({'params': params}, batch['image'], batch['text_ids'],
                       batch['text_mask'], deterministic=False, rngs={'dropout': rng})

  return embed_fn


def make_outputs_loss_fn(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                         axis_name: AxisName | None = None) -> OutputsLossFn:
  """`outputs_loss_fn(outputs) -> (loss [], aux)`: the objective of `make_loss_fn` (same
  arguments) as a function of the model's outputs on the whole batch."""
  name = config.loss.name
  contrastive = _contrastive_fn(config, mesh, axis_name)

  def outputs_loss_fn(outputs):
    loss, metrics = contrastive(outputs)
    aux = {name: loss, 'logit_scale': outputs['logit_scale'],
           'logit_bias': outputs['logit_bias'], **metrics}
    return loss, aux

  return outputs_loss_fn
