"""Fusion layers: image tokens and text tokens -> fused, text-aligned tokens.

Every fusion layer is a flax module called as

  layer(image_tokens [B, N, Di], image_mask [B, N] bool | None, text_tokens [B, L, Dt],
        text_mask [B, L] bool, deterministic=True) -> [B, L, D]

where D is `model.fusion.width` (0 = the text tower's width). `text_mask` is True for real
text tokens (padding keys are masked); `image_mask` None means every image token is valid.
The outputs at padding text positions are meaningless and must be ignored downstream.

Layers (one file each, built by `build_fusion(model_cfg)` from `model.fusion.name`):
  'cross_attention'  ALBEF / BLIP text encoder with cross-attention (cross_attention.py).
  'gated_xattn'      Flamingo: tanh-gated cross-attention before LM blocks (gated_xattn.py).
  'qformer'          BLIP-2 Q-Former, Hugging Face layer structure (qformer.py).
  'merged'           ViLT single-stream transformer on [text; image] (merged.py).

Adding a layer: write `vlm_jax/fusion/<name>.py` with the module and a builder

  @functools.partial(register_fusion, '<name>')   # or register_fusion('<name>', builder)
  def build_<name>(model_cfg: ml_collections.ConfigDict) -> nn.Module: ...

reading `model_cfg.fusion.*` (`fusion_kwargs` gives the shared options), then import the file
at the bottom of this one so that it registers itself.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.encoders.common import check_choice
from vlm_jax.nn.attention import causal_mask, combine_masks, padding_mask
from vlm_jax.nn.transformer import ACTIVATION_AXES, dense

Builder = Callable[[ml_collections.ConfigDict], nn.Module]
DTYPES = ('float32', 'bfloat16', 'float16')

FUSION_LAYERS: dict[str, Builder] = {}


def register_fusion(name: str, builder: Builder | None = None
                    ) -> Builder | Callable[[Builder], Builder]:
  """Adds `builder(model_cfg) -> nn.Module` under `name` and returns it.

  Without `builder`, returns a decorator: `@register_fusion('name')`.
  """
  if builder is None:
    return lambda fn: register_fusion(name, fn)
  FUSION_LAYERS[name] = builder
  return builder


def build_fusion(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """The fusion layer named `model_cfg.fusion.name`, built from the `model` config group."""
  check_choice('model.fusion.name', model_cfg.fusion.name, tuple(sorted(FUSION_LAYERS)))
  return FUSION_LAYERS[model_cfg.fusion.name](model_cfg)


def _dtype(name: str, what: str) -> jnp.dtype:
  check_choice(what, name, DTYPES)
  return jnp.dtype(name)


def fusion_width(model_cfg: ml_collections.ConfigDict) -> int:
  """D: `model.fusion.width`, or the text tower's width when that is 0."""
  return model_cfg.fusion.width or model_cfg.text.width


def fusion_kwargs(model_cfg: ml_collections.ConfigDict) -> dict:
  """Module attributes shared by every fusion layer, from `model_cfg.fusion` and precision."""
  c = model_cfg.fusion
  return dict(width=fusion_width(model_cfg), depth=c.depth, num_heads=c.num_heads,
              mlp_dim=c.mlp_dim, dropout_rate=c.dropout, layer_norm_eps=c.ln_eps,
              dtype=_dtype(model_cfg.dtype, 'model.dtype'),
              param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def text_activation(model_cfg: ml_collections.ConfigDict) -> str:
  """The text tower's MLP activation ('gelu' or 'quick_gelu')."""
  return 'quick_gelu' if model_cfg.text.quick_gelu else 'gelu'


def project(x: jax.Array, width: int, name: str, dtype, param_dtype) -> jax.Array:
  """[B, L, Din] -> [B, L, width] by a Dense named `name` (call from a compact method); the
  identity, without parameters, when Din == width."""
  if x.shape[-1] == width:
    return x.astype(dtype)
  return dense(width, (None, 'embed'), dtype, param_dtype, name)(x)


def text_stream(text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
                image_mask: jax.Array | None, width: int, causal: bool, dtype, param_dtype
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """The inputs of a text stream that cross-attends to image tokens (call from a compact
  method): text [B, L, Dt] projected to `width` by 'text_in' when Dt != width, its
  self-attention mask [B, 1, L | 1, L] (causal if `causal`, padding keys masked), the image
  tokens [B, N, Di] in `dtype` and their cross-attention mask [B, 1, 1, N] (None: all)."""
  x = project(text_tokens, width or text_tokens.shape[-1], 'text_in', dtype, param_dtype)
  x = nn.with_logical_constraint(x, ACTIVATION_AXES)  # [B, L, D]
  self_mask = combine_masks(causal_mask(x.shape[1]) if causal else None,
                            padding_mask(text_mask))
  cross_mask = None if image_mask is None else padding_mask(image_mask)
  return x, self_mask, image_tokens.astype(dtype), cross_mask


# The layers register themselves on import.
# pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.fusion import cross_attention  # noqa: E402,F401
from vlm_jax.fusion import gated_xattn  # noqa: E402,F401
from vlm_jax.fusion import merged  # noqa: E402,F401
from vlm_jax.fusion import qformer  # noqa: E402,F401
from vlm_jax.fusion.cross_attention import CrossAttentionFusion  # noqa: E402,F401
from vlm_jax.fusion.gated_xattn import GatedCrossAttentionFusion  # noqa: E402,F401
from vlm_jax.fusion.merged import MergedFusion  # noqa: E402,F401
from vlm_jax.fusion.qformer import QFormerFusion  # noqa: E402,F401
