"""Token and position embeddings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def text_embeddings(module: nn.Module, vocab_size: int, width: int, max_len: int, dtype,
                    param_dtype) -> tuple[nn.Embed, jax.Array]:
  """For a decoder's `setup`: a token embedding [V, D] (std 0.02) to assign to
  `module.token_embed`, and `module`'s learned position parameter 'pos_embed' [max_len, D]
  (std 0.01), as CLIP's text tower initialises them."""
  partitioned = nn.with_logical_partitioning
  token_embed = nn.Embed(
      vocab_size, width, dtype=dtype, param_dtype=param_dtype,
      embedding_init=partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')))
  pos_embed = module.param('pos_embed', partitioned(nn.initializers.normal(0.01),
                                                    (None, 'embed')),
                           (max_len, width), param_dtype)
  return token_embed, pos_embed


def posemb_sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0,
                     dtype=jnp.float32) -> jnp.ndarray:
  """Fixed 2-D sin-cos position embeddings for a height x width grid: [1, H * W, dim].

  A quarter of the channels each hold sin(x w), cos(x w), sin(y w), cos(y w) with
  frequencies w = temperature ** -(k / (dim / 4)), k = 0 .. dim / 4 - 1 (row-major tokens).
  """
  if dim % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, got {dim}.')
  y, x = np.mgrid[:height, :width]  # [H, W] each
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))  # [dim / 4]
  y = y.reshape(-1)[:, None] * omega[None]  # [H * W, dim / 4]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)  # [H * W, dim]
  return jnp.asarray(pe[None], dtype)
