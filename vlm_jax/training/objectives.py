"""Objectives as the trainer sees them: `loss_fn(params, batch, rng) -> (loss, aux)`."""
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from vlm_jax import losses

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def contrastive_terms(name: str, outputs: dict) -> tuple[jax.Array, dict]:
  """The contrastive loss `name` ('softmax' or 'sigmoid') of dual-encoder outputs."""
  loss = losses.get_loss(name)
  if name == 'sigmoid':
    return loss(outputs['image_emb'], outputs['text_emb'], outputs['logit_scale'],
                outputs['logit_bias'])
  return loss(outputs['image_emb'], outputs['text_emb'], outputs['logit_scale'])


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
  """The training objective of `config.loss` for `model` (a dual encoder for now)."""
  name = config.loss.name

  def loss_fn(params, batch, rng):
    outputs = model.apply({'params': params}, batch['image'], batch['text_ids'],
                          batch['text_mask'], deterministic=False, rngs={'dropout': rng})
    loss, metrics = contrastive_terms(name, outputs)
    aux = {name: loss, 'logit_scale': outputs['logit_scale'],
           'logit_bias': outputs['logit_bias'], **metrics}
    return loss, aux

  return loss_fn
