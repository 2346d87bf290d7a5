"""Losses by name: `get_loss(name)` returns `fn(...) -> (loss, metrics)`.

`get_sharded_loss(name)` returns the collective version of a loss, which runs on local batch
shards inside `jax.shard_map` / `jax.pmap` with a keyword `axis_name` (see `sharded`).
"""
from typing import Callable

from vlm_jax.losses.contrastive import (
    pairwise_logits, positive_mask, sigmoid_contrastive, softmax_contrastive)
from vlm_jax.losses.sharded import sigmoid_contrastive_chunked, softmax_contrastive_sharded

LossFn = Callable[..., tuple]

_LOSSES: dict[str, LossFn] = {
    'softmax': softmax_contrastive,
    'sigmoid': sigmoid_contrastive,
}

_SHARDED_LOSSES: dict[str, LossFn] = {
    'softmax': softmax_contrastive_sharded,
    'sigmoid': sigmoid_contrastive_chunked,
}


def register_loss(name: str, fn: LossFn, sharded_fn: LossFn | None = None) -> None:
  """Makes `fn` available as `get_loss(name)` (and `sharded_fn`, if given, as
  `get_sharded_loss(name)`); an existing name is an error."""
  if name in _LOSSES:
    raise ValueError(f'Loss {name!r} is already registered.')
  _LOSSES[name] = fn
  if sharded_fn is not None:
    _SHARDED_LOSSES[name] = sharded_fn


def available_losses() -> tuple[str, ...]:
  return tuple(sorted(_LOSSES))


def get_loss(name: str) -> LossFn:
  """The loss registered as `name` ('softmax': CLIP, 'sigmoid': SigLIP, ...)."""
  if name not in _LOSSES:
    raise ValueError(f'Unknown loss {name!r}; accepted: {", ".join(available_losses())}.')
  return _LOSSES[name]


def get_sharded_loss(name: str) -> LossFn:
  """The collective version of loss `name`: `fn(local shards..., *, axis_name)`."""
  if name not in _SHARDED_LOSSES:
    raise ValueError(f'Loss {name!r} has no sharded version; sharded losses: '
                     f'{", ".join(sorted(_SHARDED_LOSSES))}.')
  return _SHARDED_LOSSES[name]
