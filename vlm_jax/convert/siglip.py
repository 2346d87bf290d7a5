"""SigLIP (Hugging Face `SiglipModel`) <-> our dual encoder.

Vision: patch convolution with bias, learned positions (no class token), pre-LN blocks, a
final LayerNorm on all tokens, then the MAP head (torch `nn.MultiheadAttention`, whose
stacked q/k/v projection maps onto our cross-attention's query and key-value kernels); its
output is the image embedding (no projection). Text: bidirectional, the last position pooled,
then a linear head with bias (our `text_proj`). `logit_scale` and `logit_bias` are `t`, `b`.

SigLIP was trained on texts padded to the full length without an attention mask, so the
converted text tower attends to padding (`mask_pad=False`) and pools position L - 1 of rows
of `data.max_text_len` = the position count tokens.
"""
import ml_collections

from vlm_jax.convert import clip
from vlm_jax.convert import hf_io
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig, UnsupportedOptionError, hidden_act
from vlm_jax.defaults import base_config

NAME = 'siglip'
ARCHITECTURE = 'SiglipModel'
IGNORE = (r'.*\.position_ids',)
DROPPED = ()
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                       vision_use_head=True)
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, projection_size=None,
                     pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
# Wide enough never to bind on released checkpoints (which sit above CLIP's ln 100).
TEMPERATURE_RANGE = (-20.0, 20.0)


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  del names
  top = HfConfig(hf, {})
  v, t = top.sub('vision_config', VISION_DEFAULTS), top.sub('text_config', TEXT_DEFAULTS)
  v.require('vision_use_head', True)
  width = v['hidden_size']
  projection = t['projection_size'] if t.values.get('projection_size') else t['hidden_size']
  if projection != width:
    raise UnsupportedOptionError(
        f'Unsupported architecture option text_config.projection_size={projection} in '
        f'config.json (supported: the vision width, {width}: both towers end in the joint '
        'embedding).')
  c = base_config()
  c.model.name, c.model.embed_dim = 'dual_encoder', width
  c.model.image.update(clip.image_tower(v))
  c.model.image.update(dict(pool='map', ln_pre=False, patch_bias=True, proj=False,
                            proj_bias=False))
  c.model.text.update(clip.text_tower(t))
  c.model.text.update(dict(causal=False, pool='last', mask_pad=False, proj=True,
                           proj_bias=True))
  lo, hi = TEMPERATURE_RANGE
  c.model.temperature.update(dict(init=2.302585092994046, min=lo, max=hi,  # ln 10, -10
                                  bias_init=-10.0, learn_bias=True))
  c.data.image_size, c.data.max_text_len = v['image_size'], t['max_position_embeddings']
  c.data.mean, c.data.std = hf_io.normalisation(folder, (0.5,) * 3, (0.5,) * 3)
  return c


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  m = config.model
  i, t = m.image, m.text
  vision = dict(model_type='siglip_vision_model', hidden_size=i.width,
                intermediate_size=i.mlp_dim, num_hidden_layers=i.depth,
                num_attention_heads=i.num_heads, num_channels=3,
                image_size=clip.image_size(config), patch_size=i.patch_size,
                hidden_act=hidden_act(i), layer_norm_eps=i.ln_eps, vision_use_head=True)
  text = dict(model_type='siglip_text_model', vocab_size=t.vocab_size, hidden_size=t.width,
              intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
              num_attention_heads=t.num_heads, max_position_embeddings=clip.text_len(config),
              hidden_act=hidden_act(t), layer_norm_eps=t.ln_eps, projection_size=m.embed_dim,
              **clip.token_ids(tokenizer, TEXT_DEFAULTS))
  return dict(architectures=[ARCHITECTURE], model_type=NAME, text_config=text,
              vision_config=vision)


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  hf_io.write_preprocessor(folder, 'SiglipImageProcessor', clip.image_size(config),
                           config.data.mean, config.data.std, square=True)


def rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  i = config.model.image
  head = 'vision_model.head'
  vision = [*R.conv('image_encoder/patch_embed', 'vision_model.embeddings.patch_embedding',
                    bias=True),
            R.copy('image_encoder/pos_embed', 'vision_model.embeddings.position_embedding.weight'),
            *clip.encoder_rules('image_encoder/encoder', 'vision_model.encoder', i.depth,
                                i.num_heads),
            *R.layer_norm('image_encoder/ln_post', 'vision_model.post_layernorm'),
            R.copy('image_encoder/map_head/probe', f'{head}.probe'),
            *R.torch_mha_cross('image_encoder/map_head/attn', f'{head}.attention', i.num_heads),
            *R.layer_norm('image_encoder/map_head/ln', f'{head}.layernorm'),
            *R.mlp('image_encoder/map_head/mlp', f'{head}.mlp.fc1', f'{head}.mlp.fc2')]
  return [*vision, *clip.text_rules(config),
          *R.linear('text_proj', 'text_model.head', bias=True),
          R.squeeze('t', 'logit_scale'), R.squeeze('b', 'logit_bias')]
