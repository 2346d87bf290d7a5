"""Losses by name: `get_loss(name)` returns `fn(...) -> (loss, metrics)`."""
from typing import Callable

from vlm_jax.losses.contrastive import (
    pairwise_logits, positive_mask, sigmoid_contrastive, softmax_contrastive)

LossFn = Callable[..., tuple]

_LOSSES: dict[str, LossFn] = {
    'softmax': softmax_contrastive,
    'sigmoid': sigmoid_contrastive,
}


def register_loss(name: str, fn: LossFn) -> None:
  """Makes `fn` available as `get_loss(name)`; an existing name is an error."""
  if name in _LOSSES:
    raise ValueError(f'Loss {name!r} is already registered.')
  _LOSSES[name] = fn


def available_losses() -> tuple[str, ...]:
  return tuple(sorted(_LOSSES))


def get_loss(name: str) -> LossFn:
  """The loss registered as `name` ('softmax': CLIP, 'sigmoid': SigLIP, ...)."""
  if name not in _LOSSES:
    raise ValueError(f'Unknown loss {name!r}; accepted: {", ".join(available_losses())}.')
  return _LOSSES[name]
