"""BLIP-2 Q-Former (Hugging Face `Blip2QFormerModel` with BLIP-2's query tokens) <-> our
`qformer` model (`vlm_jax.models.qformer_model.QFormerModel`).

Our model maps image tokens [B, N, encoder_hidden_size] (mask [B, N] | None) to the query
outputs [B, Q, D]: HF's `qformer(query_embeds=query_tokens, encoder_hidden_states=...,
encoder_attention_mask=...).last_hidden_state`. In BLIP-2 the image tokens are the vision
tower's `last_hidden_state` (`Blip2Model.get_qformer_features`).

transformers keeps the query tokens in `Blip2Model`, not in `Blip2QFormerModel`, so a
checkpoint comes in one of two layouts:
  'blip_2_qformer' (this module): a `Blip2QFormerModel` folder, with the query tokens
    ('query_tokens' [1, Q, D]) in query_tokens.safetensors beside model.safetensors, and
    config.json's num_query_tokens = Q. Export writes this; transformers loads the folder
    (`Blip2QFormerModel.from_pretrained`) and ignores the extra file.
  'blip-2' (blip2.py): a full BLIP-2 checkpoint (Blip2Model, Blip2ForConditionalGeneration,
    ...), import only: qformer.* and query_tokens are converted, the vision tower, language
    model and projections are dropped with a log line.
The text feed-forward of `use_qformer_text_input` layers (intermediate, output) is dropped
too: query outputs do not use it.
"""
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from vlm_jax import fusion
from vlm_jax.convert import hf_io
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig
from vlm_jax.defaults import base_config

NAME = 'blip_2_qformer'
ARCHITECTURE = 'Blip2QFormerModel'
QUERY_FILE = 'query_tokens.safetensors'
# Tensors transformers' class does not hold, each file's kept beside model.safetensors.
EXTRA_WEIGHTS = {QUERY_FILE: ('query_tokens',)}
IGNORE = (r'.*\.position_ids',)
DROPPED = (r'encoder\.layer\.\d+\.(intermediate|output)\..*',)
DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act='gelu', layer_norm_eps=1e-12,
                cross_attention_frequency=2, encoder_hidden_size=1408)


def qformer_config(q: HfConfig, num_queries: int) -> ml_collections.ConfigDict:
  """Our full config of the Q-Former of HF config `q` with `num_queries` query tokens."""
  q.require('hidden_act', 'gelu')
  c = base_config()
  c.model.name = 'qformer'
  c.model.image.width = q['encoder_hidden_size']  # Di, the width of the image tokens
  c.model.fusion.update(dict(
      name='qformer', width=q['hidden_size'], depth=q['num_hidden_layers'],
      num_heads=q['num_attention_heads'], mlp_dim=q['intermediate_size'],
      every=q['cross_attention_frequency'], num_queries=num_queries,
      ln_eps=q['layer_norm_eps'], dropout=0.0))
  return c


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  """Q: config.json's num_query_tokens (exports write it), else the shape in QUERY_FILE."""
  if folder and 'query_tokens' not in names:
    raise R.ConversionError(
        f'{folder}: a Blip2QFormerModel checkpoint holds no query tokens (transformers keeps '
        'them in Blip2Model): convert the full BLIP-2 checkpoint (model_type \'blip-2\'), or '
        f'save them as \'query_tokens\' [1, Q, D] in {QUERY_FILE} beside it.')
  num_queries = hf.get('num_query_tokens')
  if not num_queries:
    path = os.path.join(folder, QUERY_FILE)
    if not os.path.isfile(path):
      raise R.ConversionError(f'config.json lacks num_query_tokens and there is no {path}.')
    num_queries = hf_io.read_safetensors(path)['query_tokens'].shape[1]
  return qformer_config(HfConfig(hf, DEFAULTS), int(num_queries))


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  del tokenizer
  f = config.model.fusion
  return dict(architectures=[ARCHITECTURE], model_type=NAME,
              hidden_size=fusion.fusion_width(config.model), num_hidden_layers=f.depth,
              num_attention_heads=f.num_heads, intermediate_size=f.mlp_dim, hidden_act='gelu',
              layer_norm_eps=f.ln_eps, cross_attention_frequency=f.every,
              encoder_hidden_size=config.model.image.width, use_qformer_text_input=False,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              num_query_tokens=f.num_queries)


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  del folder, config


def _query(ours: str, hf: str, heads: int) -> list[R.Rule]:
  """A query nn.Linear [H K, D] (+ bias) <-> our query_kernel [D, H, K], query_bias [H, K]."""
  kernel = R.Rule((f'{ours}_kernel',), (f'{hf}.weight',),
                  lambda w: (w.T.reshape(w.shape[1], heads, -1),),
                  lambda k: (k.reshape(k.shape[0], -1).T,))
  bias = R.Rule((f'{ours}_bias',), (f'{hf}.bias',), lambda b: (b.reshape(heads, -1),),
                lambda b: (b.reshape(-1),))
  return [kernel, bias]


def qformer_rules(ours: str, hf: str, depth: int, every: int, heads: int,
                  text_mlp: bool = False) -> list[R.Rule]:
  """HF `Blip2QFormerModel` tensors named '{hf}layernorm...', '{hf}encoder.layer.{i}...' <->
  our `QFormerFusion` parameters '{ours}ln_input', '{ours}layer_{i}/...' (no query tokens).

  Cross-attention in layers i % every == 0; `text_mlp`: the text feed-forward ('mlp_text').
  """
  out = R.layer_norm(f'{ours}ln_input', f'{hf}layernorm')
  for i in range(depth):
    o, h = f'{ours}layer_{i}', f'{hf}encoder.layer.{i}'
    a = f'{h}.attention'
    out += R.attention(f'{o}/self_attn', f'{a}.attention.query', f'{a}.attention.key',
                       f'{a}.attention.value', f'{a}.output.dense', heads)
    out += R.layer_norm(f'{o}/self_ln', f'{a}.output.LayerNorm')
    if i % every == 0:
      c = f'{h}.crossattention'
      out += _query(f'{o}/cross_attn/query', f'{c}.attention.query', heads)
      out += R.fused(f'{o}/cross_attn/kv', (f'{c}.attention.key', f'{c}.attention.value'),
                     heads)
      out += R.out_proj(f'{o}/cross_attn', f'{c}.output.dense', heads)
      out += R.layer_norm(f'{o}/cross_ln', f'{c}.output.LayerNorm')
    mlps = [('mlp_query', 'intermediate_query', 'output_query')]
    for name, fc1, fc2 in mlps + ([('mlp_text', 'intermediate', 'output')] if text_mlp else []):
      out += R.mlp(f'{o}/{name}', f'{h}.{fc1}.dense', f'{h}.{fc2}.dense')
      out += R.layer_norm(f'{o}/{name}/ln', f'{h}.{fc2}.LayerNorm')
  return out


def rules(config: ml_collections.ConfigDict, hf_prefix: str = '') -> list[R.Rule]:
  """Our `qformer` model <-> a `Blip2QFormerModel` whose names start with `hf_prefix`, plus
  'query_tokens'."""
  f = config.model.fusion
  return [R.copy('qformer/query_tokens', 'query_tokens'),
          *qformer_rules('qformer/', hf_prefix, f.depth, f.every, f.num_heads)]


def params_from_state_dict(state_dict: Mapping[str, Any], num_heads: int, prefix: str = '',
                           query_tokens: Any = None) -> dict:
  """`QFormerFusion` params from a `Blip2QFormerModel` state dict (numpy or CPU torch
  values); depth, cross-attention layers and the text feed-forward are read off the names.
  See `vlm_jax.fusion.qformer.params_from_hf_state_dict`."""
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  has = lambda i, name: f'encoder.layer.{i}.{name}.dense.weight' in sd
  depth = 0
  while f'encoder.layer.{depth}.attention.attention.query.weight' in sd:
    depth += 1
  cross = [i for i in range(depth) if has(i, 'crossattention.output')]
  every = cross[1] if len(cross) > 1 else max(depth, 1)
  if cross != list(range(0, depth, every)):
    raise R.ConversionError(f'Cross-attention in layers {cross}: not every k-th from 0.')
  out = qformer_rules('', '', depth, every, num_heads, text_mlp=depth > 0 and
                      has(0, 'intermediate'))
  if query_tokens is None:
    query_tokens = state_dict.get('query_tokens')
  if query_tokens is not None:
    sd['query_tokens'] = query_tokens
    out.append(R.copy('query_tokens', 'query_tokens'))
  flat = {}
  for rule in out:
    flat.update(zip(rule.ours, rule.to_ours(*(np.asarray(sd[n], np.float32) for n in rule.hf))))
  return R.unflatten(flat)
