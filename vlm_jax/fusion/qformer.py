"""BLIP-2 Q-Former (Li et al., 2023) with the layer structure of Hugging Face's
`Blip2QFormerModel`: BERT-style post-LN layers over [queries; text], cross-attention from the
query positions to the image tokens every `every` layers, separate query and text MLPs.

Hugging Face names -> ours (vlm_jax/convert/blip2_qformer.py maps them both ways):
  query_tokens (of Blip2Model)                   query_tokens [1, Q, D]
  layernorm                                      ln_input
  encoder.layer.{i}.attention.attention.{q,k,v}  layer_{i}/self_attn qkv_kernel [D, 3, H, K]
  encoder.layer.{i}.attention.output.dense       layer_{i}/self_attn out_kernel [H, K, D]
  encoder.layer.{i}.attention.output.LayerNorm   layer_{i}/self_ln
  encoder.layer.{i}.crossattention.attention.query  layer_{i}/cross_attn query_kernel
  encoder.layer.{i}.crossattention.attention.{key,value}  layer_{i}/cross_attn kv_kernel
  encoder.layer.{i}.crossattention.output.{dense,LayerNorm}  cross_attn out_*, cross_ln
  encoder.layer.{i}.intermediate_query.dense     layer_{i}/mlp_query/fc1
  encoder.layer.{i}.output_query.{dense,LayerNorm}  layer_{i}/mlp_query/{fc2,ln}
  encoder.layer.{i}.intermediate.dense, output.*  layer_{i}/mlp_text/{fc1,fc2,ln}
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import fusion
from vlm_jax.nn.attention import MultiHeadAttention, padding_mask
from vlm_jax.nn.transformer import ACTIVATION_AXES, dense, layer_norm

Dtype = Any


class PostLnMlp(nn.Module):
  """BERT feed-forward: x -> LN(x + fc2(gelu(fc1(x)))), exact (erf) GELU. [B, L, D] out."""
  mlp_dim: int
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    h = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, self.param_dtype, 'fc1')(x)
    h = jax.nn.gelu(h, approximate=False)  # [B, L, F]
    y = dense(x.shape[-1], ('mlp', 'embed'), self.dtype, self.param_dtype, 'fc2')(h)
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln')(x + y)


class QFormerLayer(nn.Module):
  """One Q-Former layer (HF `Blip2QFormerLayer`) on x = [queries; text] [B, Q + L, D].

    x = LN(x + SelfAttn(x))                            'self_attn', 'self_ln'
    q = x[:, :Q];  q = LN(q + CrossAttn(q, image))     'cross_attn', 'cross_ln' (if cross)
    q = mlp_query(q);  t = mlp_text(x[:, Q:])          'mlp_query', 'mlp_text' (if L > 0)
  """
  num_heads: int
  mlp_dim: int
  cross_attention: bool
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, num_queries: int, self_mask: jax.Array | None,
               image_tokens: jax.Array, cross_mask: jax.Array | None,
               deterministic: bool = True) -> jax.Array:
    """x: [B, Q + L, D]; masks broadcastable to [B, H, Q + L, Q + L] and [B, H, Q, N]."""
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    attn = lambda name: MultiHeadAttention(self.num_heads, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name=name)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    x = ln('self_ln')(x + drop(attn('self_attn')(x, mask=self_mask)))  # [B, Q + L, D]
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if self.cross_attention:
      y = attn('cross_attn')(queries, image_tokens, mask=cross_mask)  # [B, Q, D]
      queries = ln('cross_ln')(queries + drop(y))
    mlp = lambda name: PostLnMlp(self.mlp_dim, self.dropout_rate, self.layer_norm_eps,
                                 self.dtype, self.param_dtype, name=name)
    queries = mlp('mlp_query')(queries, deterministic)
    if text.shape[1]:
      queries = jnp.concatenate([queries, mlp('mlp_text')(text, deterministic)], axis=1)
    return nn.with_logical_constraint(queries, ACTIVATION_AXES)


class QFormerFusion(nn.Module):
  """Q-Former: learned queries that read the image by cross-attention, optionally jointly
  with text tokens (BLIP-2's image-grounded text encoder, as used for ITM).

  `encode_queries` gives the query outputs [B, Q, D] (HF `Blip2QFormerModel` last_hidden_state
  for query_embeds = query_tokens); `__call__` (the fusion interface) runs [queries; text]
  with joint bidirectional self-attention (text padding keys masked) and returns the text
  positions [B, L, D]. As in HF, 'ln_input' normalises every input position (queries and
  text) and there is no final LayerNorm: each layer ends in post-LNs.

  Parameters: 'query_tokens' [1, Q, D], 'text_in' (only when Dt != D), 'ln_input',
  'layer_{i}' (see QFormerLayer). Layers i with i % every == 0 have cross-attention.

  Attributes:
    width: D; 0 = the width of the text tokens (then `encode_queries` cannot be used alone).
    num_queries: Q.
    every: HF's cross_attention_frequency (BLIP-2: 2).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_queries: int = 32
  every: int = 1
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def _forward(self, image_tokens: jax.Array, image_mask: jax.Array | None,
               text_tokens: jax.Array | None, text_mask: jax.Array | None,
               deterministic: bool) -> jax.Array:
    """-> [B, Q + L, D], queries first (L = 0 without text)."""
    if self.every < 1:
      raise ValueError(f'model.fusion.every must be >= 1, got {self.every}.')
    width = self.width or (0 if text_tokens is None else text_tokens.shape[-1])
    if not width:
      raise ValueError('QFormerFusion needs width > 0 to encode queries without text.')
    batch = image_tokens.shape[0]
    queries = self.param('query_tokens', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, 'embed')),
                         (1, self.num_queries, width), self.param_dtype)
    x = jnp.broadcast_to(queries.astype(self.dtype), (batch, self.num_queries, width))
    self_mask = None
    if text_tokens is not None:
      text = fusion.project(text_tokens, width, 'text_in', self.dtype, self.param_dtype)
      x = jnp.concatenate([x, text], axis=1)  # [B, Q + L, D]
      self_mask = padding_mask(jnp.concatenate(
          [jnp.ones((batch, self.num_queries), bool), text_mask.astype(bool)], axis=1))
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    cross_mask = None if image_mask is None else padding_mask(image_mask)  # [B, 1, 1, N]
    image_tokens = image_tokens.astype(self.dtype)
    for i in range(self.depth):
      x = QFormerLayer(self.num_heads, self.mlp_dim, i % self.every == 0, self.dropout_rate,
                       self.layer_norm_eps, self.dtype, self.param_dtype,
                       name=f'layer_{i}')(x, self.num_queries, self_mask, image_tokens,
                                          cross_mask, deterministic)
    return x

  def encode_queries(self, image_tokens: jax.Array, image_mask: jax.Array | None = None,
                     deterministic: bool = True) -> jax.Array:
    """Image tokens [B, N, Di] (mask [B, N] | None) -> query outputs [B, Q, D]."""
    return self._forward(image_tokens, image_mask, None, None, deterministic)

  def __call__(self, image_tokens: jax.Array, image_mask: jax.Array | None,
               text_tokens: jax.Array, text_mask: jax.Array, deterministic: bool = True
               ) -> jax.Array:
    """Image [B, N, Di], mask [B, N] | None; text [B, L, Dt], mask [B, L] -> [B, L, D]."""
    x = self._forward(image_tokens, image_mask, text_tokens, text_mask, deterministic)
    return x[:, self.num_queries:]


@fusion.register_fusion('qformer')
def build_qformer(model_cfg: ml_collections.ConfigDict) -> QFormerFusion:
  return QFormerFusion(num_queries=model_cfg.fusion.num_queries, every=model_cfg.fusion.every,
                       **fusion.fusion_kwargs(model_cfg))


def params_from_hf_state_dict(state_dict: Mapping[str, Any], num_heads: int,
                              prefix: str = '', query_tokens: Any = None) -> dict:
  """QFormerFusion params from a Hugging Face `Blip2QFormerModel` state dict.

  Args:
    state_dict: name -> array (numpy or CPU torch tensors), e.g. `model.state_dict()`.
    num_heads: H (HF's num_attention_heads).
    prefix: prefix of the Q-Former's names, e.g. 'qformer.' in a `Blip2Model` state dict.
    query_tokens: [1, Q, D]; by default `state_dict['query_tokens']` when present (as in
      `Blip2Model`), otherwise omitted from the result.

  Returns:
    The 'params' collection (without 'text_in'); 'mlp_text' only where the state dict has
    HF's text feed-forward (`use_qformer_text_input`).
  """
  # The mapping lives with the checkpoint converter, which also maps back (export).
  from vlm_jax.convert import blip2_qformer  # pylint: disable=g-import-not-at-top
  return blip2_qformer.params_from_state_dict(state_dict, num_heads, prefix, query_tokens)
