"""BLIP-2's Q-Former alone: learned queries that read image tokens, as BLIP-2 checkpoints hold
it (Hugging Face `Blip2QFormerModel` with `Blip2Model.query_tokens`; vlm_jax/convert)."""
import flax.linen as nn
import jax


class QFormerModel(nn.Module):
  """Image tokens [B, N, Di] -> query outputs [B, Q, D].

  Built from `model.fusion` (name 'qformer'); Di is `model.image.width`, the width of the
  tokens of the image tower it reads (BLIP-2: the vision tower's last_hidden_state).

  Attributes:
    qformer: a `vlm_jax.fusion.QFormerFusion`; its parameters are 'qformer/...'.
  """
  qformer: nn.Module

  def __call__(self, image_tokens: jax.Array, image_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """image_tokens [B, N, Di], image_mask [B, N] bool (None: all valid) -> [B, Q, D]."""
    return self.qformer.encode_queries(image_tokens, image_mask, deterministic)

  def encode_queries(self, image_tokens: jax.Array, image_mask: jax.Array | None = None,
                     deterministic: bool = True) -> jax.Array:
    """The same as calling the model: query outputs [B, Q, D]."""
    return self(image_tokens, image_mask, deterministic)
