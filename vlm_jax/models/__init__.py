"""Whole models built from `config.model`: `build_model(model_cfg, text_max_len=...)`."""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlm_jax.encoders import resnet as resnet_lib
from vlm_jax.encoders import text as text_lib
from vlm_jax.encoders import vit as vit_lib
from vlm_jax.encoders.common import check_choice
from vlm_jax.models import fusion_encoder as fusion_encoder_lib
from vlm_jax.models import lora
from vlm_jax.models.blip2 import Blip2
from vlm_jax.models.blip2_qformer import Blip2QFormer, MaskedQFormer
from vlm_jax.models.causal_lm import CausalLM
from vlm_jax.models.coca import CoCa
from vlm_jax.models.dual_encoder import DualEncoder
from vlm_jax.models.fusion_encoder import FusionEncoder
from vlm_jax.models.qformer_model import QFormerModel
from vlm_jax.models.single_tower import ImageEncoder, MaskedLM
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
  if tower_cfg.quick_gelu and tower_cfg.gelu_tanh:
    raise ValueError('quick_gelu and gelu_tanh are both set in a tower config; choose one.')
  if tower_cfg.gelu_tanh:
    return 'gelu_tanh'
  return 'quick_gelu' if tower_cfg.quick_gelu else 'gelu'


def build_vit(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """The ViT of `model_cfg.image`."""
  c = model_cfg.image
  check_choice('model.image.pool', c.pool, vit_lib.POOLS)
  check_choice('model.image.posemb', c.posemb, vit_lib.POSEMBS)
  vit_lib.check_patch_dropout(c.patch_dropout)
  return vit_lib.ViT(
      patch_size=c.patch_size, width=c.width, depth=c.depth, num_heads=c.num_heads,
      mlp_dim=c.mlp_dim, pool=c.pool, posemb=c.posemb, ln_pre=c.ln_pre,
      patch_bias=c.patch_bias, posemb_grid=c.posemb_grid, patch_dropout=c.patch_dropout,
      activation=_activation(c), dropout_rate=c.dropout, layer_norm_eps=c.ln_eps,
      **_common(model_cfg))


def build_resnet(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """CLIP's modified ResNet of `model_cfg.image`; its attention pool outputs
  `model_cfg.embed_dim` (CLIP has no image projection: set `model.image.proj=False`).
  `model.remat` applies per bottleneck block; `model.scan_layers` does not apply (the blocks
  of different stages differ in shape)."""
  c = model_cfg.image
  check_choice('model.image.norm', c.norm, resnet_lib.NORMS)
  if c.patch_dropout:
    raise ValueError('model.image.patch_dropout drops ViT patch tokens; the ResNet tower '
                     "(model.image.name='resnet') has none: set it to 0.")
  common = _common(model_cfg)
  return resnet_lib.ResNet(
      layers=tuple(c.layers), width=c.width, num_heads=c.num_heads,
      output_dim=model_cfg.embed_dim, norm=c.norm, norm_groups=c.norm_groups,
      remat=common['remat'], dtype=common['dtype'], param_dtype=common['param_dtype'])


def build_text_transformer(model_cfg: ml_collections.ConfigDict, text_max_len: int
                           ) -> nn.Module:
  """The text transformer of `model_cfg.text`."""
  c = model_cfg.text
  check_choice('model.text.pool', c.pool, text_lib.POOLS)
  if c.vocab_size <= 0:
    raise ValueError('model.text.vocab_size is 0: set it, or let the trainer fill it from the '
                     'tokenizer before building the model.')
  return text_lib.TextTransformer(
      vocab_size=c.vocab_size, max_len=c.max_len or text_max_len, width=c.width,
      depth=c.depth, num_heads=c.num_heads, mlp_dim=c.mlp_dim, causal=c.causal, pool=c.pool,
      activation=_activation(c), dropout_rate=c.dropout, layer_norm_eps=c.ln_eps,
      post_ln=c.post_ln, type_vocab_size=c.type_vocab_size, mask_pad=c.mask_pad,
      **_common(model_cfg))


IMAGE_TOWERS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    'vit': build_vit,
    'resnet': build_resnet,
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
      text_proj_bias=model_cfg.text.proj_bias, image_projection=model_cfg.image.proj,
      text_projection=model_cfg.text.proj, temperature_init=temp.init,
      temperature_min=temp.min, temperature_max=temp.max, bias_init=temp.bias_init,
      learn_bias=temp.learn_bias, param_dtype=_dtype(model_cfg.param_dtype,
                                                     'model.param_dtype'))


def build_fusion_encoder(model_cfg: ml_collections.ConfigDict, *, text_max_len: int
                         ) -> FusionEncoder:
  """The dual encoder of `model_cfg` joined by the fusion layer `model_cfg.fusion.name`."""
  from vlm_jax import fusion  # pylint: disable=g-import-not-at-top (fusion imports models)
  if not model_cfg.fusion.name:
    raise ValueError("model.name='fusion_encoder' needs model.fusion.name; accepted: "
                     f'{", ".join(fusion.FUSION_LAYERS)}.')
  check_choice('model.fusion.pool', model_cfg.fusion.pool, fusion_encoder_lib.POOLS)
  return FusionEncoder(
      dual=build_dual_encoder(model_cfg, text_max_len=text_max_len),
      fusion=fusion.build_fusion(model_cfg), vocab_size=model_cfg.text.vocab_size,
      width=model_cfg.fusion.width or model_cfg.text.width, pool=model_cfg.fusion.pool,
      itm=model_cfg.heads.itm, mlm=model_cfg.heads.mlm, layer_norm_eps=model_cfg.fusion.ln_eps,
      dtype=_dtype(model_cfg.dtype, 'model.dtype'),
      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def build_image_encoder(model_cfg: ml_collections.ConfigDict, *, text_max_len: int
                        ) -> ImageEncoder:
  """The image tower of `model_cfg.image` alone (with HF ViT's pooler if `image.pooler`)."""
  del text_max_len
  return ImageEncoder(build_image_tower(model_cfg), pooler=model_cfg.image.pooler,
                      dtype=_dtype(model_cfg.dtype, 'model.dtype'),
                      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def build_masked_lm(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> MaskedLM:
  """The text tower of `model_cfg.text` with a BERT MLM head tied to its token embedding."""
  c = model_cfg.text
  return MaskedLM(build_text_tower(model_cfg, text_max_len), activation=_activation(c),
                  layer_norm_eps=c.ln_eps, dtype=_dtype(model_cfg.dtype, 'model.dtype'),
                  param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def build_qformer(model_cfg: ml_collections.ConfigDict, *, text_max_len: int
                  ) -> QFormerModel:
  """BLIP-2's Q-Former alone, from `model_cfg.fusion` (name 'qformer'): image tokens
  [B, N, model.image.width] -> query outputs [B, Q, D]."""
  del text_max_len
  from vlm_jax import fusion  # pylint: disable=g-import-not-at-top (fusion imports models)
  check_choice('model.fusion.name', model_cfg.fusion.name, ('qformer',))
  return QFormerModel(fusion.build_fusion(model_cfg))


def build_coca(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> CoCa:
  """CoCa: the image tower of `model_cfg.image`, text layers of `model_cfg.text`'s width,
  split as `model_cfg.decoder` says."""
  t, d, temp = model_cfg.text, model_cfg.decoder, model_cfg.temperature
  if t.vocab_size <= 0:
    raise ValueError('model.text.vocab_size is 0: set it, or let the trainer fill it from the '
                     'tokenizer before building the model.')
  if t.width % t.num_heads:
    raise ValueError(f'model.text.width={t.width} is not divisible by '
                     f'model.text.num_heads={t.num_heads}.')
  return CoCa(
      image_encoder=build_image_tower(model_cfg), vocab_size=t.vocab_size,
      max_len=t.max_len or text_max_len, width=t.width, num_heads=t.num_heads,
      mlp_dim=t.mlp_dim, unimodal_depth=d.unimodal_depth, multimodal_depth=d.multimodal_depth,
      num_queries=d.num_queries, embed_dim=model_cfg.embed_dim,
      tie_embeddings=d.tie_embeddings, activation=_activation(t), dropout_rate=t.dropout,
      layer_norm_eps=t.ln_eps, temperature_init=temp.init, temperature_min=temp.min,
      temperature_max=temp.max, bias_init=temp.bias_init, learn_bias=temp.learn_bias,
      dtype=_dtype(model_cfg.dtype, 'model.dtype'),
      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def build_causal_lm(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> CausalLM:
  """A decoder-only LM of `model_cfg.text`'s width, depth, heads, MLP, vocabulary, positions,
  dropout and ln_eps (`causal` and `pool` are not used); `decoder.tie_embeddings`: the LM head
  is the transposed token embedding."""
  t = model_cfg.text
  if t.vocab_size <= 0:
    raise ValueError('model.text.vocab_size is 0: set it, or let the trainer fill it from the '
                     'tokenizer before building the model.')
  return CausalLM(
      vocab_size=t.vocab_size, max_len=t.max_len or text_max_len, width=t.width,
      depth=t.depth, num_heads=t.num_heads, mlp_dim=t.mlp_dim,
      tie_embeddings=model_cfg.decoder.tie_embeddings, activation=_activation(t),
      dropout_rate=t.dropout, layer_norm_eps=t.ln_eps,
      dtype=_dtype(model_cfg.dtype, 'model.dtype'),
      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def _blip2_qformer_layers(model_cfg: ml_collections.ConfigDict, **text) -> MaskedQFormer:
  """The Q-Former of `model_cfg.fusion` (name 'qformer', an explicit width) for BLIP-2."""
  from vlm_jax import fusion  # pylint: disable=g-import-not-at-top (fusion imports models)
  f = model_cfg.fusion
  check_choice('model.fusion.name', f.name, ('qformer',))
  if f.width <= 0:
    raise ValueError('BLIP-2 needs model.fusion.width > 0 (the Q-Former width D); it does '
                     'not follow the text tower.')
  return MaskedQFormer(num_queries=f.num_queries, every=f.every, **text,
                       **fusion.fusion_kwargs(model_cfg))


def build_blip2_qformer(model_cfg: ml_collections.ConfigDict, *, text_max_len: int
                        ) -> Blip2QFormer:
  """BLIP-2 stage 1: the image tower of `model_cfg.image` and the Q-Former of
  `model_cfg.fusion`, its text side of `model_cfg.text`'s vocabulary and positions."""
  t, temp = model_cfg.text, model_cfg.temperature
  if t.vocab_size <= 0:
    raise ValueError('model.text.vocab_size is 0: set it, or let the trainer fill it from the '
                     'tokenizer before building the model.')
  qformer = _blip2_qformer_layers(model_cfg, vocab_size=t.vocab_size,
                                  max_len=t.max_len or text_max_len)
  return Blip2QFormer(
      image_encoder=build_image_tower(model_cfg), qformer=qformer,
      embed_dim=model_cfg.embed_dim, temperature_init=temp.init, temperature_min=temp.min,
      temperature_max=temp.max, bias_init=temp.bias_init, learn_bias=temp.learn_bias,
      dtype=_dtype(model_cfg.dtype, 'model.dtype'),
      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


def build_blip2(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> Blip2:
  """BLIP-2 stage 2: the image tower of `model_cfg.image`, the Q-Former of
  `model_cfg.fusion` (queries only), the adapter `model_cfg.blip2.adapter` and the causal LM
  of `model_cfg.text`."""
  return Blip2(
      image_encoder=build_image_tower(model_cfg), qformer=_blip2_qformer_layers(model_cfg),
      lm=build_causal_lm(model_cfg, text_max_len=text_max_len),
      adapter_type=model_cfg.blip2.adapter, dtype=_dtype(model_cfg.dtype, 'model.dtype'),
      param_dtype=_dtype(model_cfg.param_dtype, 'model.param_dtype'))


MODELS: dict[str, Callable[..., nn.Module]] = {
    'dual_encoder': build_dual_encoder,
    'fusion_encoder': build_fusion_encoder,
    'image_encoder': build_image_encoder,
    'masked_lm': build_masked_lm,
    'qformer': build_qformer,
    'coca': build_coca,
    'causal_lm': build_causal_lm,
    'blip2_qformer': build_blip2_qformer,
    'blip2': build_blip2,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
  """Adds `builder(model_cfg, *, text_max_len) -> nn.Module` under `name`."""
  MODELS[name] = builder


def build_model(model_cfg: ml_collections.ConfigDict, *, text_max_len: int) -> nn.Module:
  """The model named `model_cfg.name`, built from `model_cfg`.

  Args:
    model_cfg: the `model` config group; `text.vocab_size` must be filled (non-zero).
    text_max_len: the number of learned text positions (`data.max_text_len`).

  With `model_cfg.lora.rank` > 0 the model is wrapped by `lora.wrap`: its parameters gain a
  'lora' subtree, merged into the kernels at every `apply`.
  """
  check_choice('model.name', model_cfg.name, tuple(MODELS))
  model = MODELS[model_cfg.name](model_cfg, text_max_len=text_max_len)
  if model_cfg.get('lora') is None:
    return model
  return lora.wrap(model, lora.spec_from_config(model_cfg.lora))  # itself when rank is 0
