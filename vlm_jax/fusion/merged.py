"""ViLT fusion (Kim et al., 2021): one transformer over the concatenated [text; image] tokens."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import fusion
from vlm_jax.nn.attention import padding_mask
from vlm_jax.nn.transformer import ACTIVATION_AXES, Encoder, layer_norm

Dtype = Any
TEXT, IMAGE = 0, 1  # rows of 'modality_embed'


class MergedFusion(nn.Module):
  """Single-stream fusion: text and image tokens, projected to D and tagged with a learned
  modality embedding, go through `depth` pre-LN EncoderBlocks with joint bidirectional
  attention (padding keys masked), then the LayerNorm 'ln_final'; the text part is returned.

  Parameters: 'text_in' / 'image_in' (only when Dt / Di != D), 'modality_embed' [2, D]
  (row 0 text, row 1 image), 'encoder' (an Encoder: 'block_{i}' or scanned 'blocks'),
  'ln_final'.

  Attributes:
    width: D; 0 = the width of the text tokens.
    remat, scan_layers: as in `vlm_jax.nn.transformer.Encoder`.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_tokens: jax.Array, image_mask: jax.Array | None,
               text_tokens: jax.Array, text_mask: jax.Array, deterministic: bool = True
               ) -> jax.Array:
    """Image [B, N, Di], mask [B, N] | None; text [B, L, Dt], mask [B, L] -> [B, L, D]."""
    width = self.width or text_tokens.shape[-1]
    text = fusion.project(text_tokens, width, 'text_in', self.dtype, self.param_dtype)
    image = fusion.project(image_tokens, width, 'image_in', self.dtype, self.param_dtype)
    modality = self.param(
        'modality_embed', nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                       (None, 'embed')),
        (2, width), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([text + modality[TEXT], image + modality[IMAGE]], axis=1)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)  # [B, L + N, D]
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    if image_mask is None:
      image_mask = jnp.ones(image_tokens.shape[:2], bool)
    mask = padding_mask(jnp.concatenate([text_mask.astype(bool), image_mask.astype(bool)],
                                        axis=1))  # [B, 1, 1, L + N]
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.dropout_rate,
                self.layer_norm_eps, self.remat, self.scan_layers, self.dtype,
                self.param_dtype, name='encoder')(x, mask, deterministic)
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'ln_final')(x)
    return x[:, :text_tokens.shape[1]]  # [B, L, D]


@fusion.register_fusion('merged')
def build_merged(model_cfg: ml_collections.ConfigDict) -> MergedFusion:
  return MergedFusion(activation=fusion.text_activation(model_cfg), remat=model_cfg.remat,
                      scan_layers=bool(model_cfg.scan_layers), **fusion.fusion_kwargs(model_cfg))
