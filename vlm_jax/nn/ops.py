"""Small numerical helpers shared by models."""
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, computed in float32; finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
  """[..., D] x [V, D] token embedding -> [..., V] float32 logits, as one 2-D matmul (see
  `vlm_jax.nn.transformer.Dense` for why not a 3-D einsum)."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ embedding.astype(jnp.float32).T
  return flat.reshape(*x.shape[:-1], embedding.shape[0])
