"""BLIP-2 stage 1 (Li et al., 2023): the Q-Former learns to read a frozen image tower.

  images -> frozen image tower (eval mode, no gradient) -> tokens [B, N, Di]
  [queries; text] -> Q-Former layers (queries cross-attend to the tokens every `every` layers)
    under one of three self-attention masks (`attention_mask`):
      'unimodal'      queries and text do not see each other (ITC): query outputs
                      -> image_proj -> image_emb [B, Q, E]; the text's first (BOS) output
                      -> text_proj -> text_emb [B, E]; similarity = max over the queries
      'bidirectional' everything sees everything (ITM): the ITM head on each query output,
                      averaged over the queries -> [B, 2]
      'causal'        queries see queries; text sees every query and the text up to itself
                      (UniLM, for image-grounded text generation, ITG): LM head on the text
                      positions -> caption_logits [B, L, V]

The Q-Former's layers and query side are those of `vlm_jax.fusion.qformer` (Hugging Face's
`Blip2QFormerModel` layout, so its parameter names are shared with converted checkpoints);
the text side adds BERT's word and position embeddings ('text_embed', 'text_pos'), summed and
normalised by the shared input LayerNorm, as in BLIP-2. The ITG head is BERT's LM head (dense,
GELU, LayerNorm, decoder) with its own decoder matrix (BLIP-2 ties it to the word embedding).
Losses live in `vlm_jax.training.objectives` (`make_blip2_qformer_loss_fn`).

Stage 2 (`vlm_jax.models.blip2`) keeps the image tower and the query side of this Q-Former.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.fusion.qformer import QFormerLayer
from vlm_jax.models.dual_encoder import PROJ_INIT, LearnedTemperature
from vlm_jax.nn.ops import l2_normalize
from vlm_jax.nn.transformer import dense, layer_norm

Dtype = Any
MASKS = ('unimodal', 'bidirectional', 'causal')  # ITC, ITM, ITG


def attention_mask(kind: str, num_queries: int, text_mask: jax.Array) -> jax.Array:
  """The self-attention mask of [queries; text] for BLIP-2's objective `kind`.

  Args:
    kind: 'unimodal' (ITC), 'bidirectional' (ITM) or 'causal' (ITG; see the module doc).
    num_queries: Q.
    text_mask: [B, L] bool, True for real tokens; padding keys are masked in every kind.

  Returns:
    [B, 1, Q + L, Q + L] bool, True where a position (row) may attend to a key (column).
  """
  check_choice('Q-Former attention mask', kind, MASKS)
  batch, length = text_mask.shape
  total = num_queries + length
  is_query = jnp.arange(total) < num_queries  # [Q + L]
  if kind == 'bidirectional':
    allowed = jnp.ones((total, total), bool)
  elif kind == 'unimodal':
    allowed = is_query[:, None] == is_query[None, :]
  else:
    earlier = jnp.tril(jnp.ones((total, total), bool))
    allowed = jnp.where(is_query[:, None], is_query[None, :], is_query[None, :] | earlier)
  keys = jnp.concatenate([jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1)
  return allowed[None, None] & keys[:, None, None, :]


class MaskedQFormer(nn.Module):
  """The Q-Former over [queries; text] under a chosen mask (see the module doc).

  Parameters: 'query_tokens' [1, Q, D], 'ln_input', 'layer_{i}' (`QFormerLayer`; layers
  with i % every == 0 cross-attend), and with text 'text_embed', 'text_pos' [max_len, D].

  Attributes:
    width, depth, num_heads, mlp_dim: D, layers, heads, MLP width.
    num_queries: Q; every: HF's cross_attention_frequency (BLIP-2: 2).
    vocab_size, max_len: of the text side (stage 1); 0 = queries only (stage 2).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_queries: int
  every: int = 2
  vocab_size: int = 0
  max_len: int = 0
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _text_embeddings(self, text_ids: jax.Array) -> jax.Array:
    """ids [B, L] -> word + position embeddings [B, L, D]."""
    if not self.vocab_size:
      raise ValueError('This Q-Former has no text side (vocab_size 0): it reads queries only.')
    if text_ids.shape[1] > self.max_len:
      raise ValueError(f'Text length {text_ids.shape[1]} exceeds the {self.max_len} learned '
                       'positions of the Q-Former.')
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ('vocab', 'embed')),
                     name='text_embed')
    pos = self.param('text_pos', nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              (None, 'embed')),
                     (self.max_len, self.width), self.param_dtype)
    return embed(text_ids) + pos[None, :text_ids.shape[1]].astype(self.dtype)

  @nn.compact
  def __call__(self, image_tokens: jax.Array, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None, mask: str = 'bidirectional',
               deterministic: bool = True) -> jax.Array:
    """Image tokens [B, N, Di]; text ids and mask [B, L] (None: queries only); `mask` one of
    MASKS -> outputs [B, Q + L, D], queries first."""
    if self.every < 1:
      raise ValueError(f'model.fusion.every must be >= 1, got {self.every}.')
    batch = image_tokens.shape[0]
    queries = self.param('query_tokens', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, 'embed')),
                         (1, self.num_queries, self.width), self.param_dtype)
    x = jnp.broadcast_to(queries.astype(self.dtype), (batch, self.num_queries, self.width))
    self_mask = None
    if text_ids is not None:
      x = jnp.concatenate([x, self._text_embeddings(text_ids)], axis=1)  # [B, Q + L, D]
      if text_mask is None:
        text_mask = jnp.ones(text_ids.shape, bool)
      self_mask = attention_mask(mask, self.num_queries, text_mask)
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    image_tokens = image_tokens.astype(self.dtype)
    for i in range(self.depth):
      x = QFormerLayer(self.num_heads, self.mlp_dim, i % self.every == 0, self.dropout_rate,
                       self.layer_norm_eps, self.dtype, self.param_dtype,
                       name=f'layer_{i}')(x, self.num_queries, self_mask, image_tokens, None,
                                          deterministic)
    return x


def frozen_image_tokens(image_encoder: nn.Module, images: jax.Array) -> jax.Array:
  """The tokens [B, N, Di] of a frozen image tower: in evaluation mode (no dropout), and no
  gradient flows into it (BLIP-2 never trains it; `optim.frozen` must list it too, so that
  weight decay leaves it alone)."""
  return jax.lax.stop_gradient(image_encoder(images, deterministic=True)[1])


class Blip2QFormer(LearnedTemperature, nn.Module):
  """BLIP-2 stage 1: a frozen image tower and a Q-Former with its ITC, ITM and ITG heads.

  The fusion-model methods `text_tokens`, `fuse` and `itm_logits` let the ITM objective of
  the fusion encoder (hard negatives from the batch) drive this model: the Q-Former embeds
  ids itself, so a text's "tokens" are its ids.

  Attributes:
    image_encoder: images [B, H, W, 3] -> (pooled, tokens [B, N, Di]); frozen.
    qformer: a `MaskedQFormer` with a text side.
    embed_dim: E of the contrastive embeddings.
    temperature_*, bias_init, learn_bias: as in `DualEncoder` (BLIP-2: 0.07, unclamped).
  """
  image_encoder: nn.Module
  qformer: MaskedQFormer
  embed_dim: int
  temperature_init: float = 2.6592600369644165
  temperature_min: float = float('-inf')
  temperature_max: float = float('inf')
  bias_init: float = 0.0
  learn_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    proj = lambda name: nn.Dense(
        self.embed_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(PROJ_INIT, ('embed', 'joint')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('joint',)), name=name)
    self.image_proj, self.text_proj = proj('image_proj'), proj('text_proj')
    self.itm_head = nn.Dense(2, dtype=jnp.float32, param_dtype=self.param_dtype,
                             name='itm_head')
    self.lm_transform = dense(self.qformer.width, (None, 'embed'), self.dtype, self.param_dtype,
                              'lm_transform')
    self.lm_norm = layer_norm(self.qformer.layer_norm_eps, self.dtype, self.param_dtype,
                              'lm_norm')
    self.lm_decoder = dense(self.qformer.vocab_size, ('embed', 'vocab'), jnp.float32,
                            self.param_dtype, 'lm_decoder')
    self.init_temperature()

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> the frozen tower's tokens [B, N, Di]."""
    return frozen_image_tokens(self.image_encoder, images)

  def contrastive(self, image_tokens: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """ITC embeddings from one pass under the unimodal mask: image_emb [B, Q, E] (one per
    query) and text_emb [B, E] (the BOS position), float32, unit norm."""
    x = self.qformer(image_tokens, text_ids, text_mask, 'unimodal', deterministic)
    queries = self.qformer.num_queries
    image_emb = l2_normalize(self.image_proj(x[:, :queries].astype(jnp.float32)))
    return image_emb, l2_normalize(self.text_proj(x[:, queries].astype(jnp.float32)))

  def caption_logits(self, image_tokens: jax.Array, text_ids: jax.Array,
                     text_mask: jax.Array | None = None, deterministic: bool = True
                     ) -> jax.Array:
    """ITG: [B, N, Di] tokens, ids [B, L] -> next-token logits [B, L, V] float32 under the
    causal mask (padding after the text changes no earlier position)."""
    x = self.qformer(image_tokens, text_ids, text_mask, 'causal', deterministic)
    h = nn.gelu(self.lm_transform(x[:, self.qformer.num_queries:]), approximate=False)
    return self.lm_decoder(self.lm_norm(h).astype(jnp.float32))

  # The fusion-model interface of the ITM objective (`objectives._itm_terms`).

  def text_tokens(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """The ITM objective's text input: the ids themselves."""
    del text_mask, deterministic
    return text_ids

  def fuse(self, image_tokens: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
           deterministic: bool = True) -> jax.Array:
    """The query outputs [B, Q, D] of [queries; text] under the bidirectional mask."""
    x = self.qformer(image_tokens, text_ids, text_mask, 'bidirectional', deterministic)
    return x[:, :self.qformer.num_queries]

  def itm_logits(self, fused: jax.Array, text_mask: jax.Array) -> jax.Array:
    """Query outputs [B, Q, D] -> [B, 2] float32, the ITM head averaged over the queries."""
    del text_mask
    return jnp.mean(self.itm_head(fused.astype(jnp.float32)), axis=1)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Training outputs: image_emb [B, Q, E], text_emb [B, E], logit_scale, logit_bias [],
    image_tokens [B, N, Di], text_tokens (the ids) and caption_logits [B, L, V] (ITG). ITM
    runs on pairs the objective picks (`fuse`, `itm_logits`); `init` creates its head."""
    tokens = self.image_tokens(images)
    image_emb, text_emb = self.contrastive(tokens, text_ids, text_mask, deterministic)
    if self.is_initializing():
      self.itm_logits(self.fuse(tokens, text_ids, text_mask), text_mask)
    return dict(image_emb=image_emb, text_emb=text_emb, logit_scale=self.logit_scale(),
                logit_bias=self.logit_bias(), image_tokens=tokens, text_tokens=text_ids,
                caption_logits=self.caption_logits(tokens, text_ids, text_mask, deterministic))
