"""CLIP (Hugging Face `CLIPModel`) <-> our dual encoder.

Vision: bias-free patch convolution, class token, learned positions, `ln_pre`, pre-LN blocks,
`ln_post` on the class token, bias-free projection. Text: causal, learned positions, final
LayerNorm, pooled at the EOS token, bias-free projection. `logit_scale` is our `t`.

Hugging Face pools text at the first `eos_token_id` (or, when that id is 2, at the largest
token id); we pool at the last real token of the mask. Both are the EOS token for rows made
by our tokenizer (`[BOS] text [EOS] [PAD]...`).
"""
import logging
import math

import ml_collections

from vlm_jax.convert import hf_io
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig, hidden_act
from vlm_jax.defaults import base_config

NAME = 'clip'
ARCHITECTURE = 'CLIPModel'
IGNORE = (r'.*\.position_ids',)
DROPPED = ()
DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act='quick_gelu', layer_norm_eps=1e-5)
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act='quick_gelu', layer_norm_eps=1e-5, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing
STD = (0.26862954, 0.26130258, 0.27577711)


def image_tower(v: HfConfig) -> dict:
  """Our `model.image` keys shared by CLIP-like ViTs: sizes, activation, LayerNorm eps."""
  v.require('num_channels', 3)
  size, patch = v['image_size'], v['patch_size']
  if size % patch:
    raise R.ConversionError(f'{v.prefix}image_size={size} is not a multiple of '
                            f'patch_size={patch}.')
  return dict(name='vit', patch_size=patch, width=v['hidden_size'],
              depth=v['num_hidden_layers'], num_heads=v['num_attention_heads'],
              mlp_dim=v['intermediate_size'], posemb='learn', posemb_grid=size // patch,
              ln_eps=v['layer_norm_eps'], dropout=0.0, **v.activation())


def text_tower(t: HfConfig) -> dict:
  return dict(name='transformer', vocab_size=t['vocab_size'], width=t['hidden_size'],
              depth=t['num_hidden_layers'], num_heads=t['num_attention_heads'],
              mlp_dim=t['intermediate_size'], max_len=t['max_position_embeddings'],
              ln_eps=t['layer_norm_eps'], dropout=0.0, post_ln=False, type_vocab_size=0,
              **t.activation())


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  del names
  top = HfConfig(hf, DEFAULTS)
  v, t = top.sub('vision_config', VISION_DEFAULTS), top.sub('text_config', TEXT_DEFAULTS)
  c = base_config()
  c.model.name, c.model.embed_dim = 'dual_encoder', top['projection_dim']
  c.model.image.update(image_tower(v))
  c.model.image.update(dict(pool='cls', ln_pre=True, patch_bias=False, proj=True,
                            proj_bias=False))
  c.model.text.update(text_tower(t))
  c.model.text.update(dict(causal=True, pool='eot', mask_pad=True, proj=True,
                           proj_bias=False))
  c.model.temperature.update(dict(init=float(top['logit_scale_init_value']), min=0.0,
                                  max=math.log(100.0), bias_init=0.0, learn_bias=False))
  c.data.image_size, c.data.max_text_len = v['image_size'], t['max_position_embeddings']
  c.data.mean, c.data.std = hf_io.normalisation(folder, MEAN, STD)
  return c


def image_size(config: ml_collections.ConfigDict) -> int:
  """Pixels per side of the stored position grid."""
  i = config.model.image
  return (i.posemb_grid * i.patch_size) if i.posemb_grid else config.data.image_size


def text_len(config: ml_collections.ConfigDict) -> int:
  return config.model.text.max_len or config.data.max_text_len


def token_ids(tokenizer, defaults: dict) -> dict:
  """pad, bos and eos ids for a text config: Hugging Face CLIP pools at the first EOS."""
  if tokenizer is None:
    logging.warning('Exporting without a tokenizer: the text config gets the default token '
                    'ids %s; set them to the tokenizer\'s (CLIP pools at eos_token_id).',
                    {k: defaults[k] for k in ('pad_token_id', 'bos_token_id', 'eos_token_id')})
    return {k: defaults[k] for k in ('pad_token_id', 'bos_token_id', 'eos_token_id')}
  if tokenizer.eos_id == 2:
    logging.warning('EOS has id 2: Hugging Face CLIP then pools at the largest token id, not '
                    'at EOS (its legacy behaviour).')
  return dict(pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
              eos_token_id=tokenizer.eos_id)


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  m = config.model
  i, t = m.image, m.text
  vision = dict(model_type='clip_vision_model', hidden_size=i.width,
                intermediate_size=i.mlp_dim, num_hidden_layers=i.depth,
                num_attention_heads=i.num_heads, num_channels=3, image_size=image_size(config),
                patch_size=i.patch_size, hidden_act=hidden_act(i), layer_norm_eps=i.ln_eps,
                projection_dim=m.embed_dim)
  text = dict(model_type='clip_text_model', vocab_size=t.vocab_size, hidden_size=t.width,
              intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
              num_attention_heads=t.num_heads, max_position_embeddings=text_len(config),
              hidden_act=hidden_act(t), layer_norm_eps=t.ln_eps, projection_dim=m.embed_dim,
              **token_ids(tokenizer, TEXT_DEFAULTS))
  return dict(architectures=[ARCHITECTURE], model_type=NAME, projection_dim=m.embed_dim,
              logit_scale_init_value=m.temperature.init, text_config=text,
              vision_config=vision)


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  hf_io.write_preprocessor(folder, 'CLIPImageProcessor', image_size(config), config.data.mean,
                           config.data.std, square=False)


def encoder_rules(ours: str, hf: str, depth: int, heads: int) -> list[R.Rule]:
  """CLIP / SigLIP encoder layers `{hf}.layers.{i}` <-> our `{ours}/block_{i}`."""
  rules = []
  for i in range(depth):
    o, h = f'{ours}/block_{i}', f'{hf}.layers.{i}'
    a = f'{h}.self_attn'
    rules += R.attention(f'{o}/attn', f'{a}.q_proj', f'{a}.k_proj', f'{a}.v_proj',
                         f'{a}.out_proj', heads)
    rules += R.layer_norm(f'{o}/ln1', f'{h}.layer_norm1')
    rules += R.layer_norm(f'{o}/ln2', f'{h}.layer_norm2')
    rules += R.mlp(f'{o}/mlp', f'{h}.mlp.fc1', f'{h}.mlp.fc2')
  return rules


def text_rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  t = config.model.text
  return [R.copy('text_encoder/token_embed/embedding',
                 'text_model.embeddings.token_embedding.weight'),
          R.copy('text_encoder/pos_embed', 'text_model.embeddings.position_embedding.weight'),
          *encoder_rules('text_encoder/encoder', 'text_model.encoder', t.depth, t.num_heads),
          *R.layer_norm('text_encoder/ln_final', 'text_model.final_layer_norm')]


def rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  i = config.model.image
  vision = [R.copy('image_encoder/cls_token', 'vision_model.embeddings.class_embedding'),
            *R.conv('image_encoder/patch_embed', 'vision_model.embeddings.patch_embedding',
                    bias=False),
            R.copy('image_encoder/pos_embed', 'vision_model.embeddings.position_embedding.weight'),
            *R.layer_norm('image_encoder/ln_pre', 'vision_model.pre_layrnorm'),
            *encoder_rules('image_encoder/encoder', 'vision_model.encoder', i.depth,
                           i.num_heads),
            *R.layer_norm('image_encoder/ln_post', 'vision_model.post_layernorm')]
  return [*vision, *text_rules(config),
          *R.linear('image_proj', 'visual_projection', bias=False),
          *R.linear('text_proj', 'text_projection', bias=False),
          R.copy('t', 'logit_scale')]
