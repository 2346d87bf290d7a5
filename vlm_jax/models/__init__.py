"""Whole models built from `config.model`: `build_model(model_cfg, text_max_len=...)`."""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlm_jax.encoders import text as text_lib
from vlm_jax.encoders import vit as vit_lib
from vlm_jax.encoders.common import check_choice
from vlm_jax.models.dual_encoder import DualEncoder
from vlm_jax.nn.transformer import REMAT_CHOICES

DTYPES = ('float32', 'bfloat16', 'float16')


def _dtype(name: str, what: str) -> jnp.dtype:
  check_choice(what, name, DTYPES)
  return jnp.dtype(name)


def _common(model_cfg: ml_collections.ConfigDict) -> dict:
  """Options shared by every tower: precision, rematerialisation, layer scan."""
  check_choice('model.remat', model_cfg.remat, REMAT_CHOICES)
  return dict(dtype=_dtype(model_cfg.dtype, 'model.dtype'),
              param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'),
              remat=model_cfg.remat, scan_layers=bool(model_cfg.scan_layers))


def _activation(tower_cfg: ml_collections.ConfigDict) -> str:
  return 'quick_gelu' if tower_cfg.quick_gelu else 'gelu'


def build_vit(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """The ViT of `model_cfg.image`."""
  c = model_cfg.image
  check_choice('model.image.pool', c.pool, vit_lib.POOLS)
  check_choice('model.image.posemb', c.posemb, vit_lib.POSEMBS)
  return vit_lib.ViT(
      patch_size=c.patch_size, width=c.width, depth=c.depth, num_heads=c.num_heads,
      mlp_dim=c.mlp_dim, pool=c.pool, posemb=c.posemb, ln_pre=c.ln_pre,
      patch_bias=c.patch_bias, activation=_activation(c), dropout_rate=c.dropout,
      layer_norm_eps=c.ln_eps, **_common(model_cfg))


def build_text_transformer(model_cfg: ml_collections.ConfigDict, text_max_len: int
                           ) -> nn.Module:
  """The text transformer of `model_cfg.text`."""
  c = model_cfg.text
  check_choice('model.text.pool', c.pool, text_lib.POOLS)
  if c.vocab_size <= 0:
    raise ValueError('model.text.vocab_size is 0: set it, or let the trainer fill it from the '
                     'tokenizer before building the model.')
  return text_lib.TextTransformer(
      vocab_size=c.vocab_size, max_len=text_max_len, width=c.width, depth=c.depth,
      num_heads=c.num_heads, mlp_dim=c.mlp_dim, causal=c.causal, pool=c.pool,
      activation=_activation(c), dropout_rate=c.dropout, layer_norm_eps=c.ln_eps,
      **_common(model_cfg))


IMAGE_TOWERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    'vit': build_vit,
}
TEXT_TOWERS: dict[str, Callable[[ml_collections.ConfigDict, int], nn.Module]] = {
    'transformer': build_text_transformer,
}


def build_image_tower(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  check_choice('model.image.name', model_cfg.image.name, tuple(IMAGE_TOWERS))
  return IMAGE_TOWERS[model_cfg.image.name](model_cfg)


def build_text_tower(model_cfg: ml_collections.ConfigDict, text_max_len: int) -> nn.Module:
  check_choice('model.text.name', model_cfg.text.name, tuple(TEXT_TOWERS))
  return TEXT_TOWERS[model_cfg.text.name](model_cfg, text_max_len)


def build_dual_encoder(model_cfg: ml_collections.ConfigDict, *, text_max_len: int
                       ) -> DualEncoder:
  temp = model_cfg.temperature
  return DualEncoder(
      image_encoder=build_image_tower(model_cfg),
      text_encoder=build_text_tower(model_cfg, text_max_len),
      embed_dim=model_cfg.embed_dim, image_proj_bias=model_cfg.image.proj_bias,
      text_proj_bias=model_cfg.text.proj_bias, temperature_init=temp.init,
      temperature_min=temp.min, temperature_max=temp.max, bias_init=temp.bias_init,
      learn_bias=temp.learn_bias, param_dtype=_dtype(model_cfg.param_dtype,
                                                     'model.param_dtype'))


MODELS: dict[str, Callable[..., nn.Module]] = {
    'dual_encoder': build_dual_encoder,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
  """Adds `builder(model_cfg, *, text_max_len) -> nn.Module` under `name`."""
  MODELS[name] = builder


def build_model(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> nn.Module:
  """The model named `model_cfg.name`, built from `model_cfg`.

  Args:
    model_cfg: the `model` config group; `text.vocab_size` must be filled (non-zero).
    text_max_len: the number of learned text positions (`data.max_text_len`).
  """
  check_choice('model.name', model_cfg.name, tuple(MODELS))
  return MODELS[model_cfg.name](model_cfg, text_max_len=text_max_len)
