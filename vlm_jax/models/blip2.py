"""BLIP-2 stage 2 (Li et al., 2023): generation through a frozen language model.

  images -> frozen image tower -> tokens [B, N, Di] -> Q-Former (queries only) [B, Q, Dq]
      -> adapter -> soft prefix [B, Q, D] -> frozen decoder-only LM (`CausalLM`), the prefix
      before the text -> caption_logits [B, L, V]

The image tower and the Q-Former come from a stage-1 checkpoint (`Blip2QFormer`), the LM from
a causal LM trained alone on text; the adapter ('linear': BLIP-2's single projection; 'mlp':
Dense-GELU-Dense) is new. Which parts train is the optimizer's business (`optim.frozen`,
`model.lora`); the image tower runs in evaluation mode without gradient in any case.

The model is a captioner for `vlm_jax.inference`: `init_cache` computes the prefix once and
runs it through the LM into its KV caches; `decode_step` reads one text token per row.
VQA is captioning with `[BOS] question` as the prompt after the prefix.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.models.blip2_qformer import frozen_image_tokens
from vlm_jax.models.causal_lm import Cache, CausalLM
from vlm_jax.nn.transformer import dense

Dtype = Any
ADAPTERS = ('linear', 'mlp')


class Adapter(nn.Module):
  """Query outputs [B, Q, Dq] -> LM input embeddings [B, Q, width]: 'fc1' ('linear'), or
  'fc1', GELU, 'fc2' ('mlp')."""
  width: int
  kind: str = 'linear'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_choice('model.blip2.adapter', self.kind, ADAPTERS)
    if self.kind == 'linear':
      return dense(self.width, (None, 'embed'), self.dtype, self.param_dtype, 'fc1')(x)
    h = dense(self.width, (None, 'mlp'), self.dtype, self.param_dtype, 'fc1')(x)
    h = jax.nn.gelu(h, approximate=False)
    return dense(self.width, ('mlp', 'embed'), self.dtype, self.param_dtype, 'fc2')(h)


class Blip2(nn.Module):
  """BLIP-2 stage 2 (see the module docstring).

  Parameters: 'image_encoder', 'qformer' (the query side of stage 1's), 'adapter', 'lm'.

  Attributes:
    image_encoder: images [B, H, W, 3] -> (pooled, tokens [B, N, Di]); frozen.
    qformer: a `MaskedQFormer` (queries only).
    lm: the `CausalLM`.
    adapter_type: 'linear' or 'mlp' (`model.blip2.adapter`).
  """
  image_encoder: nn.Module
  qformer: nn.Module
  lm: CausalLM
  adapter_type: str = 'linear'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.adapter = Adapter(self.lm.width, self.adapter_type, self.dtype, self.param_dtype)

  def context(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> the LM's soft prefix [B, Q, D]."""
    queries = self.qformer(frozen_image_tokens(self.image_encoder, images),
                           deterministic=deterministic)  # [B, Q, Dq]
    return self.adapter(queries)

  def caption_logits(self, context: jax.Array, text_ids: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """Prefix [B, Q, D], ids [B, L] -> next-token logits [B, L, V] float32."""
    return self.lm.caption_logits(context, text_ids, deterministic)

  def logits(self, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """The uncached full-sequence reference: images, ids [B, L] -> [B, L, V] float32."""
    return self.caption_logits(self.context(images), text_ids)

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Training outputs: context (the prefix) [B, Q, D] and caption_logits [B, L, V] of the
    input ids (causal: padding after the text is not read, so `text_mask` is not needed)."""
    del text_mask
    context = self.context(images, deterministic)
    return dict(context=context,
                caption_logits=self.caption_logits(context, text_ids, deterministic))

  def init_cache(self, images: jax.Array, max_len: int) -> Cache:
    """The decoding state of B images: their prefix in the LM's caches (`CausalLM.prefill`)
    for texts of up to `max_len` tokens."""
    return self.lm.prefill(self.context(images), max_len)

  def decode_step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """tokens int32 [B] -> (next-token logits [B, V] float32, the advanced cache)."""
    return self.lm.decode_step(cache, tokens)
