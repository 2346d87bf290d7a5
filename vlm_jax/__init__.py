"""vlm_jax: vision-language models in JAX."""
