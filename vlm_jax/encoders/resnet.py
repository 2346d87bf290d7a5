"""CLIP's modified ResNet image tower (Radford et al., 2021), with GroupNorm.

Against torchvision's ResNet it has CLIP's three changes: a stem of three 3x3 convolutions
followed by a 2x2 average pool (instead of one 7x7 convolution and a max pool); anti-aliased
strided blocks, where a 2x2 average pool before a stride-1 convolution replaces the strided
convolution, in the residual branch and in the shortcut; and attention pooling instead of
global average pooling (`AttentionPool`).

Normalisation is GroupNorm, not CLIP's BatchNorm: batch statistics would couple the examples
of a contrastive batch (the positives and negatives of one another), need cross-device
synchronisation under sharding and mutable state in every train path; GroupNorm is per
example. A layer of C channels uses gcd(norm_groups, C) groups: `norm_groups` when it
divides C, fewer for narrow layers.

Strides: the stem divides the image side by 4, then every stage after the first by 2, so
the final map of an S px image is S / (4 * 2^(stages - 1)) on a side: 7 x 7 for CLIP's
RN50 (four stages) at 224 px; 2 x 2 for three stages at 32 px (four would leave 1 x 1).
"""
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.common import check_choice
from vlm_jax.nn.attention import MultiHeadAttention
from vlm_jax.nn.transformer import REMAT_CHOICES, REMAT_POLICIES

Dtype = Any
NORMS = ('group',)
EXPANSION = 4  # bottleneck output channels / inner channels
# He initialisation for ReLU networks, fan-out mode (torchvision's ResNet init).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def total_stride(num_stages: int) -> int:
  """The side of the image over the side of the final map: 4 (stem) x 2 per later stage."""
  return 4 * 2 ** (num_stages - 1)


def check_resnet_images(images: jax.Array, num_stages: int) -> None:
  """Raises a readable ValueError unless images are [B, H, W, 3] with H and W multiples of
  the total stride of a ResNet with `num_stages` stages."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected images shaped [batch, height, width, 3] (NHWC, RGB), got '
                     f'shape {tuple(images.shape)}.')
  _, height, width, _ = images.shape
  stride = total_stride(num_stages)
  if height % stride or width % stride:
    raise ValueError(
        f'Image size {height}x{width} does not fit a ResNet of {num_stages} stages: its side '
        f'must be a multiple of the total stride {stride} (the stem divides it by 4, each '
        'stage after the first by 2). Resize the images or change model.image.layers.')


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
          strides: int = 1) -> nn.Conv:
  """A bias-free k x k convolution padded by k // 2 on each side (PyTorch's padding); its
  kernel [k, k, Cin, Cout] has its output channels named 'embed'."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(CONV_INIT,
                                                          (None, None, None, 'embed')))


def _norm(channels: int, groups: int, name: str, dtype: Dtype, param_dtype: Dtype,
          zero_scale: bool = False) -> nn.GroupNorm:
  """GroupNorm over `channels` with gcd(groups, channels) groups; `zero_scale` starts the
  scale at 0 (the last norm of a residual branch: each block starts as the identity)."""
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(
      num_groups=math.gcd(groups, channels), epsilon=1e-5, dtype=dtype,
      param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(scale_init, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


def _avg_pool(x: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] -> [B, H / size, W / size, C]."""
  return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> (2x2 average pool if strided) -> 1x1 (x4 channels), plus the shortcut.

  [B, H, W, Cin] -> [B, H / stride, W / stride, 4 planes]. The shortcut is the identity
  when shapes allow, else an average pool (if strided), a 1x1 convolution and a norm.
  """
  planes: int
  stride: int = 1
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda c, k, name: _conv(c, k, name, self.dtype, self.param_dtype)
    norm = lambda c, name, zero=False: _norm(c, self.norm_groups, name, self.dtype,
                                             self.param_dtype, zero)
    out_channels = self.planes * EXPANSION
    y = nn.relu(norm(self.planes, 'norm1')(conv(self.planes, 1, 'conv1')(x)))
    y = nn.relu(norm(self.planes, 'norm2')(conv(self.planes, 3, 'conv2')(y)))
    y = _avg_pool(y, self.stride)
    y = norm(out_channels, 'norm3', zero=True)(conv(out_channels, 1, 'conv3')(y))
    shortcut = x
    if self.stride > 1 or x.shape[-1] != out_channels:
      shortcut = conv(out_channels, 1, 'downsample_conv')(_avg_pool(x, self.stride))
      shortcut = norm(out_channels, 'downsample_norm')(shortcut)
    return nn.relu(y + shortcut)


class AttentionPool(nn.Module):
  """CLIP's attention pooling: tokens [B, N, C] -> [B, out_features].

  The mean token is prepended, learned positions [N + 1, C] are added to all N + 1 tokens,
  and multi-head attention with the mean token as the only query (keys and values: all
  N + 1 tokens) is projected to `out_features`.
  """
  num_heads: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, num_tokens, width = x.shape
    x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)  # [B, N + 1, C]
    pos = self.param('pos_embed', nn.with_logical_partitioning(
        nn.initializers.normal(width ** -0.5), (None, 'embed')),
                     (num_tokens + 1, width), self.param_dtype)
    x = x + pos.astype(self.dtype)[None]
    y = MultiHeadAttention(self.num_heads, out_features=self.out_features, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='attn')(x[:, :1], x)
    return y[:, 0]  # [B, out_features]


class ResNet(nn.Module):
  """Images [B, H, W, 3] -> (pooled [B, output_dim], tokens [B, h w, C]).

  tokens: the final feature map [B, h, w, C] flattened, C = 4 width 2^(stages - 1),
  h = H / (4 * 2^(stages - 1)); pooled: its attention pooling.

  Attributes:
    layers: bottleneck blocks per stage; stage i has 4 width 2^i output channels and
      (after the first) halves the map.
    width: the stem's output channels (its first two convolutions have width / 2).
    num_heads: heads of the attention pooling (C must be divisible by them).
    output_dim: width of the pooled output (CLIP: the joint embedding width).
    norm: 'group' (GroupNorm; see the module docstring for why not BatchNorm).
    norm_groups: GroupNorm groups (gcd(norm_groups, C) for a layer of C channels).
    remat: 'none', 'full' or 'dots_saveable': rematerialise each bottleneck block.
  """
  layers: tuple[int, ...]
  width: int
  num_heads: int
  output_dim: int
  norm: str = 'group'
  norm_groups: int = 32
  remat: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self) -> None:
    check_choice('model.image.norm', self.norm, NORMS)
    check_choice('model.remat', self.remat, REMAT_CHOICES)
    if not self.layers or any(n < 1 for n in self.layers):
      raise ValueError(f'model.image.layers must list at least one stage of at least one '
                       f'block each, got {tuple(self.layers)}.')
    if self.width < 2 or self.norm_groups < 1:
      raise ValueError(f'model.image.width must be >= 2 and model.image.norm_groups >= 1, '
                       f'got {self.width} and {self.norm_groups}.')

  def _stem(self, x: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, H / 4, W / 4, width]."""
    half = self.width // 2
    for i, (channels, stride) in enumerate([(half, 2), (half, 1), (self.width, 1)], 1):
      x = _conv(channels, 3, f'stem_conv{i}', self.dtype, self.param_dtype, stride)(x)
      x = nn.relu(_norm(channels, self.norm_groups, f'stem_norm{i}', self.dtype,
                        self.param_dtype)(x))
    return _avg_pool(x, 2)

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True, pooled_only: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    # No dropout in the ResNet; its attention pool needs every token, so `pooled_only` (the
    # towers' common argument, see `DualEncoder`) changes nothing.
    del deterministic, pooled_only
    self._check()
    check_resnet_images(images, len(self.layers))
    block_cls = Bottleneck
    if self.remat != 'none':
      block_cls = nn.remat(Bottleneck, policy=REMAT_POLICIES[self.remat])
    x = self._stem(images.astype(self.dtype))
    for stage, num_blocks in enumerate(self.layers):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(self.width * 2 ** stage, stride, self.norm_groups, self.dtype,
                      self.param_dtype, name=f'stage{stage}_block{block}')(x)
    tokens = einops.rearrange(x, 'b h w c -> b (h w) c')  # [B, h w, C]
    if tokens.shape[-1] % self.num_heads:
      raise ValueError(f'The final feature map has {tokens.shape[-1]} channels, not divisible '
                       f'by model.image.num_heads={self.num_heads} (attention pooling).')
    pooled = AttentionPool(self.num_heads, self.output_dim, self.dtype, self.param_dtype,
                           name='attn_pool')(tokens)
    return pooled, tokens
