"""One tower with its own head: an image encoder (Hugging Face `ViTModel`) and a masked
language model (`BertForMaskedLM`). Both are what pretrained single-tower checkpoints hold;
the trainer's objectives are for dual and fusion encoders.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn.ops import tied_logits
from vlm_jax.nn.transformer import activation_fn, dense, layer_norm

Dtype = Any


class ImageEncoder(nn.Module):
  """An image tower alone: images [B, H, W, 3] -> named outputs.

  Attributes:
    image_encoder: images -> (pooled [B, D], tokens [B, N, D]).
    pooler: Hugging Face ViT's pooler, dense + tanh on the pooled (class) token.
  """
  image_encoder: nn.Module
  pooler: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    """Returns pooled [B, D], tokens [B, N, D] and, with `pooler`, pooler_output [B, D]."""
    pooled, tokens = self.image_encoder(images, deterministic=deterministic)
    outputs = {'pooled': pooled, 'tokens': tokens}
    if self.pooler:
      width = pooled.shape[-1]
      outputs['pooler_output'] = jnp.tanh(
          dense(width, ('embed', 'mlp'), self.dtype, self.param_dtype, 'pooler')(pooled))
    return outputs

  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> [B, D]: the pooler output, or the pooled tokens without a pooler."""
    outputs = self(images, deterministic)
    return outputs.get('pooler_output', outputs['pooled'])


class MlmHead(nn.Module):
  """BERT's masked-LM head: dense, activation, LayerNorm, then logits against the (tied)
  token embedding plus a bias. tokens [B, L, D], embedding [V, D] -> logits [B, L, V] f32."""
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, embedding: jax.Array) -> jax.Array:
    width, vocab = tokens.shape[-1], embedding.shape[0]
    h = dense(width, ('embed', 'mlp'), self.dtype, self.param_dtype, 'transform')(tokens)
    h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln')(
        activation_fn(self.activation)(h))  # [B, L, D]
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (vocab,), self.param_dtype)
    return tied_logits(h, embedding) + bias.astype(jnp.float32)


class MaskedLM(nn.Module):
  """A bidirectional text tower with an MLM head whose decoder is its token embedding.

  Attributes:
    text_encoder: (ids [B, L], mask [B, L]) -> (pooled, tokens [B, L, D]); its parameters
      hold `token_embed/embedding` [V, D] (a `TextTransformer`).
    activation, layer_norm_eps: of the head's transform.
  """
  text_encoder: nn.Module
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, deterministic: bool = True
               ) -> dict[str, jax.Array]:
    """Returns logits [B, L, V] float32, tokens [B, L, D] and pooled [B, D]."""
    pooled, tokens = self.text_encoder(text_ids, text_mask, deterministic=deterministic)
    embedding = nn.unbox(self.text_encoder.variables['params']['token_embed']['embedding'])
    logits = MlmHead(self.activation, self.layer_norm_eps, self.dtype, self.param_dtype,
                     name='mlm_head')(tokens, embedding)
    return {'logits': logits, 'tokens': tokens, 'pooled': pooled}

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """ids [B, L], mask [B, L] -> the pooled tokens [B, D] (not normalised)."""
    return self(text_ids, text_mask, deterministic)['pooled']
