"""Vision Transformer image tower (Dosovitskiy et al., 2021), with CLIP's, SigLIP's and FLIP's
options."""
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.nn.embeddings import posemb_sincos_2d
from vlm_jax.nn.pooling import MAPHead, cls_pool, mean_pool
from vlm_jax.nn.transformer import ACTIVATION_AXES, Encoder, layer_norm

Dtype = Any
POOLS = ('cls', 'map', 'gap')
POSEMBS = ('learn', 'sincos2d')


def check_images(images: jax.Array, patch_size: int) -> None:
  """Raises a readable ValueError unless images are [B, H, W, 3] with H, W multiples of the
  patch size."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected images shaped [batch, height, width, 3] (NHWC, RGB), got '
                     f'shape {tuple(images.shape)}.')
  _, height, width, _ = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f'Image size {height}x{width} is not divisible by the patch size '
                     f'{patch_size}; resize the images or change model.image.patch_size.')


def kept_patches(num_patches: int, fraction: float) -> int:
  """Patches that patch dropout keeps: N - round(fraction N), halves rounded up, at least 1."""
  return max(num_patches - math.floor(fraction * num_patches + 0.5), 1)


def check_patch_dropout(fraction: float) -> None:
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'model.image.patch_dropout must be in [0, 1), got {fraction}.')


def drop_patches(rng: jax.Array, x: jax.Array, fraction: float, num_prefix: int = 0
                 ) -> jax.Array:
  """FLIP's patch dropout: [B, P + N, D] -> [B, P + K, D], K = kept_patches(N, fraction).

  The P leading tokens (the class token) are kept; of the N patch tokens each example keeps
  its own random K, gathered in their original order, so that what follows computes on
  P + K tokens (masking would not shrink the compute).
  """
  prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
  batch, num_patches = patches.shape[:2]
  keep = kept_patches(num_patches, fraction)
  _, index = jax.lax.top_k(jax.random.uniform(rng, (batch, num_patches)), keep)  # [B, K]
  kept = jnp.take_along_axis(patches, jnp.sort(index, axis=-1)[..., None], axis=1)
  return jnp.concatenate([prefix, kept], axis=1)  # [B, P + K, D]


class ViT(nn.Module):
  """Images [B, H, W, 3] -> (pooled [B, D], tokens [B, N, D]), after the final LayerNorm.
  With `pooled_only=True` and pool 'cls', tokens is None and the last block computes the
  class token's row alone (see `Encoder`).

  N = H W / patch_size^2 (in training with patch_dropout, the kept patches), plus one with
  the class token (pool 'cls').

  Attributes:
    pool: 'cls' (class token, CLIP), 'map' (attention pooling, SigLIP) or 'gap' (mean).
    posemb: 'learn' (normal, std width^-0.5 as CLIP) or 'sincos2d' (fixed).
    ln_pre: LayerNorm before the blocks (CLIP).
    patch_bias: bias on the patch embedding (CLIP has none).
    posemb_grid: side G of the learned position grid (posemb 'learn'); 0 = the grid of the
      images at init. With G > 0 the positions of a G x G grid are stored and resized
      (bicubic) to the grid of other image sizes, e.g. a 224 px checkpoint on 32 px images.
    patch_dropout: fraction of the patch tokens dropped per example in training (FLIP; see
      `drop_patches`), after the positions are added; none at evaluation (deterministic).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pool: str = 'cls'
  posemb: str = 'learn'
  ln_pre: bool = False
  patch_bias: bool = True
  posemb_grid: int = 0
  patch_dropout: float = 0.0
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _patchify(self, images: jax.Array) -> tuple[jax.Array, int, int]:
    """[B, H, W, 3] -> ([B, h w, D], h, w) by a stride-p convolution."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', use_bias=self.patch_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, name='patch_embed',
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, 'patch', 'embed')),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                )(images.astype(self.dtype))  # [B, h, w, D]
    _, h, w, _ = x.shape
    return einops.rearrange(x, 'b h w d -> b (h w) d'), h, w

  def _learned(self, name: str, shape: tuple[int, ...]) -> jax.Array:
    init = nn.initializers.normal(self.width ** -0.5)
    axes = (None,) * (len(shape) - 1) + ('embed',)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      self.param_dtype).astype(self.dtype)

  def _learned_posemb(self, h: int, w: int, num_tokens: int) -> jax.Array:
    """[N(+1), D] learned positions for an h x w grid (after the class token, if any)."""
    if not self.posemb_grid:
      return self._learned('pos_embed', (num_tokens, self.width))
    g, extra = self.posemb_grid, num_tokens - h * w  # extra: 1 with the class token
    pos = self._learned('pos_embed', (extra + g * g, self.width))
    if (h, w) == (g, g):
      return pos
    grid = einops.rearrange(pos[extra:], '(h w) d -> h w d', h=g)
    grid = jax.image.resize(grid.astype(jnp.float32), (h, w, self.width), 'cubic',
                            antialias=False).astype(self.dtype)  # [h, w, D]
    return jnp.concatenate([pos[:extra], einops.rearrange(grid, 'h w d -> (h w) d')])

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True, pooled_only: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
    check_choice('model.image.pool', self.pool, POOLS)
    check_choice('model.image.posemb', self.posemb, POSEMBS)
    check_images(images, self.patch_size)
    check_patch_dropout(self.patch_dropout)
    x, h, w = self._patchify(images)  # [B, N, D]
    batch = x.shape[0]
    if self.posemb == 'sincos2d':
      x = x + posemb_sincos_2d(h, w, self.width, dtype=self.dtype)
    if self.pool == 'cls':
      cls = self._learned('cls_token', (self.width,))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    if self.posemb == 'learn':
      x = x + self._learned_posemb(h, w, x.shape[1])[None]  # [B, N(+1), D]
    if self.patch_dropout and not deterministic:
      x = drop_patches(self.make_rng('dropout'), x, self.patch_dropout,
                       num_prefix=int(self.pool == 'cls'))  # [B, K(+1), D]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    if self.ln_pre:
      x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_pre')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    cls_only = pooled_only and self.pool == 'cls'
    rows = jnp.zeros((batch, 1), jnp.int32) if cls_only else None
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.dropout_rate,
                self.layer_norm_eps, self.remat, self.scan_layers, self.dtype,
                self.param_dtype, name='encoder')(x, None, deterministic, rows)
    # x: [B, N(+1), D], or [B, 1, D] with cls_only
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_post')(x)
    if cls_only:
      return x[:, 0], None
    if self.pool == 'cls':
      pooled = cls_pool(x)
    elif self.pool == 'map':
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                       self.dtype, self.param_dtype, name='map_head')(x)
    else:
      pooled = mean_pool(x)
    return pooled, x
