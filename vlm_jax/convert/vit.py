"""ViT (Hugging Face `ViTModel`) <-> our `image_encoder` model.

Patch convolution with bias, class token, learned positions, pre-LN blocks, a final LayerNorm
on all tokens (our `ln_post`; `last_hidden_state` is our `tokens`), and the optional pooler
(dense + tanh on the class token), present when the checkpoint has its weights.
"""
import ml_collections

from vlm_jax.convert import clip
from vlm_jax.convert import hf_io
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig, UnsupportedOptionError, hidden_act
from vlm_jax.defaults import base_config

NAME = 'vit'
ARCHITECTURE = 'ViTModel'
IGNORE = ()
DROPPED = ()
DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act='gelu', layer_norm_eps=1e-12,
                image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                pooler_output_size=None, pooler_act='tanh')


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  v = HfConfig(hf, DEFAULTS)
  v.require('qkv_bias', True)
  pooler = 'pooler.dense.weight' in names
  if pooler:
    v.require('pooler_act', 'tanh')
    size = v.values.get('pooler_output_size') or v['hidden_size']
    if size != v['hidden_size']:
      raise UnsupportedOptionError(
          f'Unsupported architecture option pooler_output_size={size} in config.json '
          f'(supported: hidden_size, {v["hidden_size"]}).')
  c = base_config()
  c.model.name = 'image_encoder'
  c.model.image.update(clip.image_tower(v))
  c.model.image.update(dict(pool='cls', ln_pre=False, patch_bias=True, pooler=pooler))
  c.data.image_size = v['image_size']
  c.data.mean, c.data.std = hf_io.normalisation(folder, (0.5,) * 3, (0.5,) * 3)
  return c


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  del tokenizer
  i = config.model.image
  return dict(architectures=[ARCHITECTURE], model_type=NAME, hidden_size=i.width,
              num_hidden_layers=i.depth, num_attention_heads=i.num_heads,
              intermediate_size=i.mlp_dim, hidden_act=hidden_act(i, 'gelu_new'),
              layer_norm_eps=i.ln_eps, image_size=clip.image_size(config),
              patch_size=i.patch_size, num_channels=3, qkv_bias=True,
              pooler_output_size=i.width, pooler_act='tanh', hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  hf_io.write_preprocessor(folder, 'ViTImageProcessor', clip.image_size(config),
                           config.data.mean, config.data.std, square=True)


def rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  i = config.model.image
  out = [R.squeeze('image_encoder/cls_token', 'embeddings.cls_token', 2),
         *R.conv('image_encoder/patch_embed', 'embeddings.patch_embeddings.projection',
                 bias=True),
         R.squeeze('image_encoder/pos_embed', 'embeddings.position_embeddings', 1)]
  for n in range(i.depth):
    o, h = f'image_encoder/encoder/block_{n}', f'encoder.layer.{n}'
    a = f'{h}.attention.attention'
    out += R.attention(f'{o}/attn', f'{a}.query', f'{a}.key', f'{a}.value',
                       f'{h}.attention.output.dense', i.num_heads)
    out += R.layer_norm(f'{o}/ln1', f'{h}.layernorm_before')
    out += R.layer_norm(f'{o}/ln2', f'{h}.layernorm_after')
    out += R.mlp(f'{o}/mlp', f'{h}.intermediate.dense', f'{h}.output.dense')
  out += R.layer_norm('image_encoder/ln_post', 'layernorm')
  if i.pooler:
    out += R.linear('pooler', 'pooler.dense')
  return out
