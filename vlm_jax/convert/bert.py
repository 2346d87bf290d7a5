"""BERT (Hugging Face `BertForMaskedLM`) <-> our `masked_lm` model.

Word, position and token-type embeddings (type 0), an embedding LayerNorm, post-LN blocks
(`post_ln`), no final LayerNorm; the MLM head is dense + activation + LayerNorm, then the
word embeddings (tied) plus a bias. A `BertForPreTraining` checkpoint converts too: its
pooler and next-sentence head are dropped (with a log line).
"""
import ml_collections

from vlm_jax.convert import clip
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig, hidden_act
from vlm_jax.convert.rules import ConversionError
from vlm_jax.defaults import base_config

NAME = 'bert'
ARCHITECTURE = 'BertForMaskedLM'
# Buffers, and the decoder that transformers ties to the word embeddings on load.
IGNORE = (r'.*\.position_ids', r'cls\.predictions\.decoder\.(weight|bias)')
DROPPED = (r'bert\.pooler\..*', r'cls\.seq_relationship\..*')
DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072, hidden_act='gelu',
                max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                pad_token_id=0, is_decoder=False, add_cross_attention=False,
                tie_word_embeddings=True, position_embedding_type='absolute')


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  del folder, names
  t = HfConfig(hf, DEFAULTS)
  t.require('is_decoder', False)
  t.require('add_cross_attention', False)
  t.require('tie_word_embeddings', True)
  t.require('position_embedding_type', 'absolute')
  c = base_config()
  c.model.name = 'masked_lm'
  c.model.text.update(clip.text_tower(t))
  c.model.text.update(dict(causal=False, pool='cls', post_ln=True, mask_pad=True,
                           type_vocab_size=t['type_vocab_size']))
  c.data.max_text_len = t['max_position_embeddings']
  return c


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  t = config.model.text
  if t.type_vocab_size < 1:
    raise ConversionError('BERT needs token-type embeddings: model.text.type_vocab_size is 0.')
  return dict(architectures=[ARCHITECTURE], model_type=NAME, vocab_size=t.vocab_size,
              hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
              intermediate_size=t.mlp_dim, hidden_act=hidden_act(t, 'gelu_new'),
              max_position_embeddings=clip.text_len(config),
              type_vocab_size=t.type_vocab_size, layer_norm_eps=t.ln_eps,
              pad_token_id=tokenizer.pad_id if tokenizer is not None else 0,
              tie_word_embeddings=True, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  del folder, config


def rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  t = config.model.text
  e = 'bert.embeddings'
  out = [R.copy('text_encoder/token_embed/embedding', f'{e}.word_embeddings.weight'),
         R.copy('text_encoder/pos_embed', f'{e}.position_embeddings.weight'),
         R.copy('text_encoder/type_embed/embedding', f'{e}.token_type_embeddings.weight'),
         *R.layer_norm('text_encoder/ln_embed', f'{e}.LayerNorm')]
  for n in range(t.depth):
    o, h = f'text_encoder/encoder/block_{n}', f'bert.encoder.layer.{n}'
    a = f'{h}.attention.self'
    out += R.attention(f'{o}/attn', f'{a}.query', f'{a}.key', f'{a}.value',
                       f'{h}.attention.output.dense', t.num_heads)
    out += R.layer_norm(f'{o}/ln1', f'{h}.attention.output.LayerNorm')
    out += R.layer_norm(f'{o}/ln2', f'{h}.output.LayerNorm')
    out += R.mlp(f'{o}/mlp', f'{h}.intermediate.dense', f'{h}.output.dense')
  p = 'cls.predictions'
  return [*out, *R.linear('mlm_head/transform', f'{p}.transform.dense'),
          *R.layer_norm('mlm_head/ln', f'{p}.transform.LayerNorm'),
          R.copy('mlm_head/bias', f'{p}.bias')]
