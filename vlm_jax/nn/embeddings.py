"""Position embeddings."""
import jax.numpy as jnp
import numpy as np


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
