"""Dual encoder (CLIP, SigLIP): an image and a text tower projected into one embedding space.

The towers compute in the model dtype; projections, normalisation, the temperature and the
bias are float32 whatever that dtype is (half-precision normalisation and logits are a
common source of NaN losses).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn.ops import l2_normalize
from vlm_jax.nn.transformer import Dense

Dtype = Any
# std = fan_in^-0.5, untruncated: CLIP's projection init.
PROJ_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')


class LearnedTemperature:
  """Methods of a contrastive model (a flax Module with the fields temperature_init,
  temperature_min, temperature_max, bias_init, learn_bias, param_dtype): the learnable
  log-scale 't' and, with `learn_bias`, the bias 'b' (top-level parameters)."""

  def init_temperature(self) -> None:
    """Creates 't' (and 'b'); call from `setup`."""
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
    self.t = self.param('t', scalar(self.temperature_init), (), self.param_dtype)
    if self.learn_bias:
      self.b = self.param('b', scalar(self.bias_init), (), self.param_dtype)

  def logit_scale(self) -> jax.Array:
    """exp(clip(t, min, max)), a float32 scalar."""
    t = jnp.clip(self.t.astype(jnp.float32), self.temperature_min, self.temperature_max)
    return jnp.exp(t)

  def logit_bias(self) -> jax.Array:
    """The learned bias, or the constant `bias_init`; a float32 scalar."""
    if self.learn_bias:
      return self.b.astype(jnp.float32)
    return jnp.asarray(self.bias_init, jnp.float32)


class DualEncoder(LearnedTemperature, nn.Module):
  """Two towers, each `(inputs..., deterministic, pooled_only=False) -> (pooled [B, D],
  tokens [B, N, D])`, and projections. `encode_image` and `encode_text` (and so `__call__`)
  need the pooled outputs alone and pass `pooled_only=True`, with which a tower may skip
  work that only its tokens need and return None for them.

  Attributes:
    image_encoder: images [B, H, W, 3] -> (pooled [B, Di], tokens).
    text_encoder: (ids [B, L], mask [B, L]) -> (pooled [B, Dt], tokens).
    embed_dim: E, the joint embedding width.
    image_proj_bias, text_proj_bias: biases on the projections (CLIP has none).
    temperature_init, temperature_min, temperature_max: the learnable log-scale `t`;
      logit_scale = exp(clip(t, min, max)).
    bias_init, learn_bias: the logit bias (SigLIP learns it; otherwise a constant).
    param_dtype: dtype of the projection, temperature and bias parameters.
    image_projection, text_projection: False leaves out that projection: the tower's pooled
      output (of width E) is the embedding (SigLIP's image tower ends in its MAP head).
  """
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int
  image_proj_bias: bool = False
  text_proj_bias: bool = False
  temperature_init: float = 2.6592600369644165
  temperature_min: float = 0.0
  temperature_max: float = 4.605170185988092
  bias_init: float = 0.0
  learn_bias: bool = False
  param_dtype: Dtype = jnp.float32
  image_projection: bool = True
  text_projection: bool = True

  def _proj(self, use_bias: bool, name: str) -> nn.Dense:
    return Dense(
        self.embed_dim, use_bias=use_bias, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(PROJ_INIT, ('embed', 'joint')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('joint',)), name=name)

  def setup(self):
    identity = lambda x: x
    self.image_proj = (self._proj(self.image_proj_bias, 'image_proj')
                       if self.image_projection else identity)
    self.text_proj = (self._proj(self.text_proj_bias, 'text_proj')
                      if self.text_projection else identity)
    self.init_temperature()

  def _image_tower(self, images: jax.Array, deterministic: bool, pooled_only: bool
                   ) -> tuple[jax.Array, jax.Array | None]:
    """(embedding [B, E] float32 unit norm, tower tokens [B, N, Di] or None)."""
    pooled, tokens = self.image_encoder(images, deterministic=deterministic,
                                        pooled_only=pooled_only)  # [B, Di]
    return l2_normalize(self.image_proj(pooled.astype(jnp.float32))), tokens

  def _text_tower(self, text_ids: jax.Array, text_mask: jax.Array, deterministic: bool,
                  pooled_only: bool) -> tuple[jax.Array, jax.Array | None]:
    """(embedding [B, E] float32 unit norm, tower tokens [B, L, Dt] or None)."""
    pooled, tokens = self.text_encoder(text_ids, text_mask, deterministic=deterministic,
                                       pooled_only=pooled_only)  # [B, Dt]
    return l2_normalize(self.text_proj(pooled.astype(jnp.float32))), tokens

  def encode_image_tokens(self, images: jax.Array, deterministic: bool = True
                          ) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, 3] -> (embedding [B, E] float32 unit norm, tower tokens [B, N, Di])."""
    return self._image_tower(images, deterministic, pooled_only=False)

  def encode_text_tokens(self, text_ids: jax.Array, text_mask: jax.Array,
                         deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """ids [B, L], mask [B, L] -> (embedding [B, E] float32 unit norm, tokens [B, L, Dt])."""
    return self._text_tower(text_ids, text_mask, deterministic, pooled_only=False)

  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] float -> [B, E] float32, unit L2 norm."""
    return self._image_tower(images, deterministic, pooled_only=True)[0]

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array,
                  deterministic: bool = True) -> jax.Array:
    """ids [B, L] int32, mask [B, L] bool -> [B, E] float32, unit L2 norm."""
    return self._text_tower(text_ids, text_mask, deterministic, pooled_only=True)[0]

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Returns image_emb [B, E], text_emb [B, E], logit_scale [], logit_bias [] (float32)."""
    return dict(image_emb=self.encode_image(images, deterministic),
                text_emb=self.encode_text(text_ids, text_mask, deterministic),
                logit_scale=self.logit_scale(), logit_bias=self.logit_bias())
