"""A decoder-only causal language model that can read a soft prefix of embeddings.

  prefix [B, P, D] (optional) ; token + position embeddings of ids [B, L]
      -> causal pre-LN decoder blocks (self-attention only) -> LN -> LM head -> [B, L, V]

Trained alone on the captions and question-answer text of a dataset
(`configs/lm_shapes.py`, `model.name='causal_lm'`), it is the frozen language model of BLIP-2
stage 2 (`vlm_jax.models.blip2`), which puts adapted Q-Former outputs before the text as a
soft prefix. Prefix positions take no position embedding: the text keeps the positions
0 .. L-1 it was trained at, and the prefix is placed before it by the causal mask alone.

Decoding: `prefill(prefix, max_len)` runs the prefix once into self-attention caches of
P + max_len positions; `decode_step(cache, tokens)` then reads one token per row. Alone, the
model is a captioner that does not look at the image (`init_cache` ignores the images): its
captions and answers are the language prior that BLIP-2's image prefix has to move.
The model returns named outputs and knows nothing of losses.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn.attention import causal_mask
from vlm_jax.nn.decoder import DecoderBlock
from vlm_jax.nn.embeddings import text_embeddings
from vlm_jax.nn.ops import tied_logits
from vlm_jax.nn.transformer import dense, layer_norm

Dtype = Any
Cache = dict[str, Any]


class CausalLM(nn.Module):
  """GPT-style language model (see the module docstring).

  Parameters: 'token_embed', 'pos_embed' [max_len, D], 'block_{i}' (`DecoderBlock` without
  cross-attention), 'ln_final', 'lm_head' (absent with `tie_embeddings`: the LM head is then
  the transposed token embedding).

  Attributes:
    vocab_size: V; max_len: learned text positions (the longest text, prompt included).
    width, depth, num_heads, mlp_dim: D, layers, heads and MLP width.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  tie_embeddings: bool = False
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f'model.text.width={self.width} is not divisible by '
                       f'model.text.num_heads={self.num_heads}.')
    self.token_embed, self.pos_embed = text_embeddings(
        self, self.vocab_size, self.width, self.max_len, self.dtype, self.param_dtype)
    self.blocks = [DecoderBlock(self.num_heads, self.mlp_dim, False, self.activation,
                                self.dropout_rate, self.layer_norm_eps, self.dtype,
                                self.param_dtype, name=f'block_{i}')
                   for i in range(self.depth)]
    self.ln_final = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')
    if not self.tie_embeddings:
      self.lm_head = dense(self.vocab_size, ('embed', 'vocab'), jnp.float32, self.param_dtype,
                           'lm_head')

  def _check_length(self, length: int) -> None:
    if length > self.max_len:
      raise ValueError(f'Text length {length} exceeds the {self.max_len} learned positions '
                       '(model.text.max_len, or data.max_text_len).')

  def _lm_logits(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, V] float32."""
    x = self.ln_final(x).astype(jnp.float32)
    if self.tie_embeddings:
      return tied_logits(x, self.token_embed.embedding)
    return self.lm_head(x)

  def caption_logits(self, context: jax.Array | None, text_ids: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """Prefix [B, P, D] (None or P = 0: none) and ids [B, L] -> next-token logits [B, L, V]
    float32 at the text positions (position t predicts token t + 1; padding after the text
    does not change earlier positions)."""
    if text_ids.ndim != 2:
      raise ValueError(f'Expected text ids shaped [batch, length], got {text_ids.shape}.')
    self._check_length(text_ids.shape[1])
    x = self.token_embed(text_ids) + self.pos_embed[None, :text_ids.shape[1]].astype(self.dtype)
    prefix_len = 0 if context is None else context.shape[1]
    if prefix_len:
      x = jnp.concatenate([context.astype(self.dtype), x], axis=1)  # [B, P + L, D]
    mask = causal_mask(x.shape[1])
    for block in self.blocks:
      x = block(x, None, mask, deterministic)
    return self._lm_logits(x[:, prefix_len:])

  def empty_prefix(self, batch: int) -> jax.Array:
    """A prefix of no positions, [B, 0, D]."""
    return jnp.zeros((batch, 0, self.width), self.dtype)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Training outputs of the LM alone: context (an empty prefix [B, 0, D]) and
    caption_logits [B, L, V] of the ids. `images` and `text_mask` are not read (the
    trainer's model interface passes them)."""
    del images, text_mask
    context = self.empty_prefix(text_ids.shape[0])
    return dict(context=context,
                caption_logits=self.caption_logits(context, text_ids, deterministic))

  def logits(self, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """The uncached full-sequence reference: ids [B, L] -> [B, L, V] float32."""
    del images
    return self.caption_logits(None, text_ids)

  # Incremental decoding (see `vlm_jax.inference`). Cache leaves but the shared scalars
  # 'index' (the next cache slot) and 'prefix_len' have the batch as their leading axis.

  def prefill(self, prefix: jax.Array, max_len: int) -> Cache:
    """The decoding state after prefix [B, P, D], for texts of up to `max_len` tokens.

    Returns:
      {'index': int32 [] (P), 'prefix_len': int32 [] (P), 'self': per block {'key',
      'value'} [B, P + max_len, H, K], the prefix's keys and values written}.
    """
    if not 1 <= max_len <= self.max_len:
      raise ValueError(f'Decoding max_len={max_len} must be in [1, {self.max_len}] (the '
                       'learned text positions).')
    batch, prefix_len = prefix.shape[:2]
    head_dim = self.width // self.num_heads
    zeros = jnp.zeros((batch, prefix_len + max_len, self.num_heads, head_dim), self.dtype)
    caches = [{'key': zeros, 'value': zeros} for _ in self.blocks]
    if prefix_len:
      x, start = prefix.astype(self.dtype), jnp.zeros((), jnp.int32)
      for i, block in enumerate(self.blocks):
        x, caches[i] = block.step(x, caches[i], start)
    index = jnp.asarray(prefix_len, jnp.int32)
    return {'index': index, 'prefix_len': index, 'self': caches}

  def init_cache(self, images: jax.Array, max_len: int) -> Cache:
    """The LM alone as a captioner: an empty prefix (the images are not read)."""
    return self.prefill(self.empty_prefix(images.shape[0]), max_len)

  def decode_step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """tokens int32 [B] at the next position -> (next-token logits [B, V] float32, the cache
    advanced by one position)."""
    index = cache['index']
    position = index - cache['prefix_len']  # of the token in the text
    pos = jax.lax.dynamic_slice_in_dim(self.pos_embed, position, 1).astype(self.dtype)
    x = self.token_embed(tokens[:, None]) + pos[None]  # [B, 1, D]
    caches = []
    for block, layer_cache in zip(self.blocks, cache['self']):
      x, layer_cache = block.step(x, layer_cache, index)
      caches.append(layer_cache)
    logits = self._lm_logits(x)[:, 0]  # [B, V]
    return logits, {**cache, 'index': index + 1, 'self': caches}
