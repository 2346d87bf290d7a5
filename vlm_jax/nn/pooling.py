"""Pooling of token sequences [B, L, D] to one vector per example [B, D]."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn.attention import MultiHeadAttention, padding_mask
from vlm_jax.nn.transformer import Mlp, layer_norm

Dtype = Any


def cls_pool(x: jax.Array) -> jax.Array:
  """The first token: [B, L, D] -> [B, D]."""
  return x[:, 0]


def eot_index(mask: jax.Array) -> jax.Array:
  """[B, L] bool -> [B] int32: the position of the last real token (the EOS/EOT token).

  The tokenizer ends every sequence with EOS as its last real token, so this is
  `mask.sum(-1) - 1` (clipped to 0 for an all-padding row).
  """
  return jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def eot_pool(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The token at the EOS position: x [B, L, D], mask [B, L] bool -> [B, D]."""
  index = eot_index(mask)[:, None, None]  # [B, 1, 1]
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


def mean_pool(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over (real) tokens: x [B, L, D], mask [B, L] bool or None -> [B, D]."""
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(x.dtype)[..., None]  # [B, L, 1]
  total = jnp.sum(x * weights, axis=1)  # [B, D]
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1)


class MAPHead(nn.Module):
  """Multihead attention pooling (SigLIP): a learned probe attends over the tokens, followed
  by a residual MLP. [B, L, D] -> [B, D]."""
  num_heads: int
  mlp_dim: int | None = None  # default 4 * D
  activation: str = 'gelu'
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; mask: optional [B, L] bool of real tokens."""
    batch, _, width = x.shape
    probe = self.param(
        'probe', nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                              (None, None, 'embed')),
        (1, 1, width), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))  # [B, 1, D]
    attn_mask = None if mask is None else padding_mask(mask)  # [B, 1, 1, L]
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name='attn')(probe, x, mask=attn_mask)  # [B, 1, D]
    z = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln')(y)
    y = y + Mlp(self.mlp_dim or 4 * width, self.activation, dtype=self.dtype,
                param_dtype=self.param_dtype, name='mlp')(z)
    return y[:, 0]


class AttentionalPooler(nn.Module):
  """Attentional pooling (CoCa): `num_queries` learned queries attend over the (layer-normed)
  tokens, then a LayerNorm. [B, N, Di] -> [B, num_queries, width]."""
  num_queries: int
  width: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: [B, N, Di]; mask: optional [B, N] bool of real tokens."""
    queries = self.param(
        'queries', nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed')),
        (self.num_queries, self.width), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype),
                               (x.shape[0], self.num_queries, self.width))  # [B, Q, D]
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_kv')(x)
    attn_mask = None if mask is None else padding_mask(mask)  # [B, 1, 1, N]
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name='attn')(queries, x, mask=attn_mask)  # [B, Q, D]
    return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_out')(y)
