"""Building blocks: attention, transformer blocks and stacks, pooling, embeddings."""
from vlm_jax.nn.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from vlm_jax.nn.decoder import DecoderBlock
from vlm_jax.nn.embeddings import posemb_sincos_2d
from vlm_jax.nn.ops import l2_normalize
from vlm_jax.nn.pooling import (
    AttentionalPooler, MAPHead, cls_pool, eot_index, eot_pool, mean_pool)
from vlm_jax.nn.transformer import (
    ACTIVATIONS, REMAT_CHOICES, Encoder, EncoderBlock, Mlp, activation_fn, quick_gelu,
    stack_layer_params, unstack_layer_params)
