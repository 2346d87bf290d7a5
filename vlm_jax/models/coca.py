"""CoCa (Yu et al., 2022): a contrastive captioner.

  images -> image tower -> tokens [B, N, Di] -> attentional pooler, 1 + Q learned queries
      query 0             -> image_proj -> image_emb [B, E]           (contrastive)
      queries 1 .. Q      -> context [B, Q, D]                         (decoder's image input)
  [BOS] caption [EOS] ... [CLS] -> unimodal layers (causal self-attention only)
      the [CLS] output    -> text_proj -> text_emb [B, E]             (contrastive)
      the text outputs    -> multimodal layers (causal self-attention + cross-attention to
                             the context) -> LM head -> logits [B, L, V] (captioning)

The contrastive text embedding reads a learned [CLS] token appended after the (padded) text,
as in the paper: it attends, causally, to every real token and is seen by none, so the text
positions' outputs are the same with or without it, and decoding never needs it. It has no
position embedding (it is unique anyway). The LM head is a separate [D, V] matrix by
default, as in open_clip's CoCa; `tie_embeddings` reuses the token embedding instead.

For generation, `init_cache(images, max_len)` computes the image context once (the
cross-attention keys and values of every multimodal layer) and zero self-attention caches
[B, max_len, H, K]; `decode_step(cache, tokens)` advances every row by one token. The
uncached reference (`init_reference_cache`, `reference_step`) recomputes the whole sequence
at every step; `logits` is the full-sequence forward pass. The model returns named outputs
and knows nothing of losses (see `vlm_jax.training.objectives`). `model.remat` and
`model.scan_layers` apply to the image tower; the text layers are a plain loop.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.dual_encoder import PROJ_INIT, LearnedTemperature
from vlm_jax.nn.attention import causal_mask, combine_masks, padding_mask
from vlm_jax.nn.decoder import DecoderBlock
from vlm_jax.nn.embeddings import text_embeddings
from vlm_jax.nn.ops import l2_normalize, tied_logits
from vlm_jax.nn.pooling import AttentionalPooler
from vlm_jax.nn.transformer import dense, layer_norm

Dtype = Any
Cache = dict[str, Any]


class CoCa(LearnedTemperature, nn.Module):
  """Contrastive captioner (see the module docstring).

  Attributes:
    image_encoder: images [B, H, W, 3] -> (pooled, tokens [B, N, Di]).
    vocab_size: V; max_len: learned text positions (the longest sequence, prompt included).
    width, num_heads, mlp_dim: D, heads and MLP width of the text layers and the pooler.
    unimodal_depth, multimodal_depth: causal text layers without / with cross-attention.
    num_queries: Q, the pooled image tokens the multimodal layers attend to.
    embed_dim: E, the contrastive embedding width.
    tie_embeddings: the LM head is the transposed token embedding (else its own matrix).
    temperature_*, bias_init, learn_bias: as in `DualEncoder`.
  """
  image_encoder: nn.Module
  vocab_size: int
  max_len: int
  width: int
  num_heads: int
  mlp_dim: int
  unimodal_depth: int
  multimodal_depth: int
  num_queries: int
  embed_dim: int
  tie_embeddings: bool = False
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  temperature_init: float = 2.6592600369644165
  temperature_min: float = 0.0
  temperature_max: float = 4.605170185988092
  bias_init: float = 0.0
  learn_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.num_queries < 1 or self.multimodal_depth < 1:
      raise ValueError(f'CoCa needs model.decoder.num_queries >= 1 and multimodal_depth >= 1, '
                       f'got {self.num_queries} and {self.multimodal_depth}.')
    partitioned = nn.with_logical_partitioning
    self.token_embed, self.pos_embed = text_embeddings(
        self, self.vocab_size, self.width, self.max_len, self.dtype, self.param_dtype)
    self.cls_token = self.param('cls_token', partitioned(nn.initializers.normal(0.02),
                                                         ('embed',)),
                                (self.width,), self.param_dtype)
    block = lambda cross: DecoderBlock(
        self.num_heads, self.mlp_dim, cross, self.activation, self.dropout_rate,
        self.layer_norm_eps, self.dtype, self.param_dtype)
    self.unimodal = [block(False) for _ in range(self.unimodal_depth)]
    self.multimodal = [block(True) for _ in range(self.multimodal_depth)]
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    self.ln_unimodal, self.ln_final = ln('ln_unimodal'), ln('ln_final')
    self.pooler = AttentionalPooler(self.num_queries + 1, self.width, self.num_heads,
                                    self.layer_norm_eps, self.dtype, self.param_dtype)
    proj = lambda name: nn.Dense(
        self.embed_dim, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=partitioned(PROJ_INIT, ('embed', 'joint')), name=name)
    self.image_proj, self.text_proj = proj('image_proj'), proj('text_proj')
    if not self.tie_embeddings:
      self.lm_head = dense(self.vocab_size, ('embed', 'vocab'), jnp.float32, self.param_dtype,
                           'lm_head')
    self.init_temperature()

  # Image side.

  def image_features(self, images: jax.Array, deterministic: bool = True
                     ) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, 3] -> (image_emb [B, E] float32 unit norm, context [B, Q, D])."""
    _, tokens = self.image_encoder(images, deterministic=deterministic)  # [B, N, Di]
    pooled = self.pooler(tokens)  # [B, 1 + Q, D]
    image_emb = l2_normalize(self.image_proj(pooled[:, 0].astype(jnp.float32)))
    return image_emb, pooled[:, 1:]

  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> [B, E] float32, unit L2 norm."""
    return self.image_features(images, deterministic)[0]

  # Text side.

  def _check_ids(self, text_ids: jax.Array) -> None:
    if text_ids.ndim != 2:
      raise ValueError(f'Expected text ids shaped [batch, length], got {text_ids.shape}.')
    if text_ids.shape[1] > self.max_len:
      raise ValueError(f'Text length {text_ids.shape[1]} exceeds the {self.max_len} learned '
                       'positions (model.text.max_len, or data.max_text_len).')

  def _embed(self, text_ids: jax.Array) -> jax.Array:
    """[B, L] -> [B, L, D]: token and position embeddings."""
    x = self.token_embed(text_ids)
    return x + self.pos_embed[None, :text_ids.shape[1]].astype(self.dtype)

  def _unimodal(self, text_ids: jax.Array, text_mask: jax.Array | None,
                deterministic: bool) -> tuple[jax.Array, jax.Array | None]:
    """ids [B, L] -> (text outputs [B, L, D], [CLS] output [B, D]); with `text_mask` None,
    no [CLS] is appended (decoding) and the second output is None."""
    self._check_ids(text_ids)
    x = self._embed(text_ids)  # [B, L, D]
    batch, length = text_ids.shape
    if text_mask is None:
      mask = causal_mask(length)
    else:
      cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (batch, 1, self.width))
      x = jnp.concatenate([x, cls], axis=1)  # [B, L + 1, D]
      keys = jnp.concatenate([text_mask.astype(bool), jnp.ones((batch, 1), bool)], axis=1)
      mask = combine_masks(causal_mask(length + 1), padding_mask(keys))
    for layer in self.unimodal:
      x = layer(x, None, mask, deterministic)
    x = self.ln_unimodal(x)
    if text_mask is None:
      return x, None
    return x[:, :length], x[:, length]

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """ids [B, L] int32, mask [B, L] bool -> [B, E] float32, unit L2 norm (the [CLS])."""
    if text_mask.shape != text_ids.shape:
      raise ValueError(f'text_ids {text_ids.shape} and text_mask {text_mask.shape} differ.')
    _, cls = self._unimodal(text_ids, text_mask, deterministic)
    return l2_normalize(self.text_proj(cls.astype(jnp.float32)))

  def _lm_logits(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, V] float32."""
    x = self.ln_final(x).astype(jnp.float32)
    if self.tie_embeddings:
      return tied_logits(x, self.token_embed.embedding)
    return self.lm_head(x)

  def _multimodal(self, x: jax.Array, context: jax.Array, deterministic: bool) -> jax.Array:
    """Unimodal outputs [B, L, D] and context [B, Q, D] -> logits [B, L, V] float32."""
    mask = causal_mask(x.shape[1])
    for layer in self.multimodal:
      x = layer(x, context, mask, deterministic)
    return self._lm_logits(x)

  def caption_logits(self, context: jax.Array, text_ids: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """Context [B, Q, D], ids [B, L] -> next-token logits [B, L, V] float32 (position t
    predicts token t + 1; padding after the text does not change earlier positions)."""
    x, _ = self._unimodal(text_ids, None, deterministic)
    return self._multimodal(x, context, deterministic)

  def logits(self, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """The uncached full-sequence reference: images, ids [B, L] -> [B, L, V] float32."""
    return self.caption_logits(self.image_features(images)[1], text_ids)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Training outputs: image_emb, text_emb [B, E]; logit_scale, logit_bias []; context
    [B, Q, D]; caption_logits [B, L, V] (float32) of the input ids, which predict the ids
    shifted by one (`vlm_jax.losses.captioning.next_token_targets`)."""
    image_emb, context = self.image_features(images, deterministic)
    tokens, cls = self._unimodal(text_ids, text_mask, deterministic)
    return dict(image_emb=image_emb,
                text_emb=l2_normalize(self.text_proj(cls.astype(jnp.float32))),
                logit_scale=self.logit_scale(), logit_bias=self.logit_bias(), context=context,
                caption_logits=self._multimodal(tokens, context, deterministic))

  # Incremental decoding (see `vlm_jax.inference`): every leaf of a cache but the shared
  # position `index` has the batch as its leading axis, so beam search can tile and gather it.

  def _check_cache_len(self, max_len: int) -> None:
    if not 1 <= max_len <= self.max_len:
      raise ValueError(f'Decoding max_len={max_len} must be in [1, {self.max_len}] (the '
                       'learned text positions).')

  def init_cache(self, images: jax.Array, max_len: int) -> Cache:
    """The decoding state of B images for sequences of up to `max_len` tokens.

    Returns:
      {'index': int32 [] (0), 'self': per text layer {'key', 'value'} zeros [B, max_len, H,
      K], 'cross': per multimodal layer {'key', 'value'} [B, Q, H, K] of the image context}.
    """
    self._check_cache_len(max_len)
    context = self.image_features(images)[1]  # [B, Q, D]
    batch, head_dim = context.shape[0], self.width // self.num_heads
    zeros = jnp.zeros((batch, max_len, self.num_heads, head_dim), self.dtype)
    cross = [dict(zip(('key', 'value'), layer.context_kv(context))) for layer in self.multimodal]
    return {'index': jnp.zeros((), jnp.int32),
            'self': [{'key': zeros, 'value': zeros}
                     for _ in range(self.unimodal_depth + self.multimodal_depth)],
            'cross': cross}

  def decode_step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """tokens int32 [B] at position cache['index'] -> (next-token logits [B, V] float32,
    the cache advanced by one position)."""
    index = cache['index']
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed, index, 1).astype(self.dtype)  # [1, D]
    x = self.token_embed(tokens[:, None]) + pos[None]  # [B, 1, D]
    new_self = []
    for i, layer in enumerate(self.unimodal):
      x, layer_cache = layer.step(x, cache['self'][i], index)
      new_self.append(layer_cache)
    x = self.ln_unimodal(x)
    for i, layer in enumerate(self.multimodal):
      kv = (cache['cross'][i]['key'], cache['cross'][i]['value'])
      x, layer_cache = layer.step(x, cache['self'][self.unimodal_depth + i], index, kv)
      new_self.append(layer_cache)
    logits = self._lm_logits(x)[:, 0]  # [B, V]
    return logits, {'index': index + 1, 'self': new_self, 'cross': cache['cross']}

  def init_reference_cache(self, images: jax.Array, max_len: int) -> Cache:
    """The uncached reference's state: {'index': int32 [], 'tokens': int32 [B, max_len],
    'context': [B, Q, D]}."""
    self._check_cache_len(max_len)
    context = self.image_features(images)[1]
    return {'index': jnp.zeros((), jnp.int32),
            'tokens': jnp.zeros((context.shape[0], max_len), jnp.int32), 'context': context}

  def reference_step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """`decode_step` without a KV cache: writes `tokens` [B] into the sequence and recomputes
    all of it (max_len positions) to read the logits [B, V] at the current position."""
    index = cache['index']
    ids = jax.lax.dynamic_update_slice_in_dim(cache['tokens'], tokens[:, None].astype(jnp.int32),
                                              index, axis=1)
    logits = self.caption_logits(cache['context'], ids)  # [B, M, V]
    logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    return logits, {'index': index + 1, 'tokens': ids, 'context': cache['context']}
