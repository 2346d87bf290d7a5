"""Cross-attention maps: which image tokens each text token attends to in a fusion layer.

`MultiHeadAttention` does not return its attention weights, so
they are recomputed: the model runs once under a flax method interceptor that records the
inputs of every cross-attention module (a `MultiHeadAttention` named 'cross_attn' called with
key-value inputs: ALBEF's, Flamingo's and the Q-Former's fusion layers), and the chosen one's
probabilities are computed from those inputs and that module's own parameters:

  softmax(q k^T / sqrt(K)) over the keys, q = x Wq + bq, k = image Wk + bk, per head.

Nothing changes in the model and nothing is stored when this is not used. The probabilities
are computed in float32 (a bfloat16 model attends with bfloat16 q and k).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.nn.attention import MultiHeadAttention

CROSS_ATTENTION_NAME = 'cross_attn'


@dataclasses.dataclass
class CrossAttentionCall:
  """The inputs of one call of a cross-attention module.

  Attributes:
    path: the module's scope path, e.g. ('fusion', 'block_0', 'cross_attn').
    inputs_q: [B, Lq, D] (e.g. the layer-normalised text stream).
    inputs_kv: [B, N, Dkv] (the image tokens).
    mask: bool, broadcastable to [B, H, Lq, N], or None (every key).
  """
  path: tuple[str, ...]
  inputs_q: jax.Array
  inputs_kv: jax.Array
  mask: jax.Array | None


def cross_attention_calls(model: nn.Module, params: Any, *args, method: Any = None,
                          **kwargs) -> list[CrossAttentionCall]:
  """Runs `model.apply({'params': params}, *args, method=method, **kwargs)` and returns the
  inputs of every cross-attention call, in call order."""
  calls = []

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name == '__call__' and isinstance(module, MultiHeadAttention)
        and module.name == CROSS_ATTENTION_NAME):
      bound = _bind(call_args, call_kwargs)
      if bound['inputs_kv'] is not None:
        calls.append(CrossAttentionCall(tuple(module.scope.path), **bound))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    model.apply({'params': params}, *args, method=method, **kwargs)
  return calls


def _bind(args: tuple, kwargs: dict) -> dict:
  """MultiHeadAttention.__call__(inputs_q, inputs_kv, mask, bias) arguments by name."""
  names = ('inputs_q', 'inputs_kv', 'mask', 'bias')
  bound = dict(zip(names, args), **kwargs)
  if bound.get('bias') is not None:
    raise ValueError('Cross-attention with an additive logits bias is not supported.')
  return {k: bound.get(k) for k in names[:3]}


def _module_params(params: Any, path: tuple[str, ...]) -> dict:
  node = nn.unbox(params)
  for name in path:
    node = node[name]
  return node


def attention_probs(call: CrossAttentionCall, params: Any) -> jax.Array:
  """The attention probabilities [B, H, Lq, N] (float32) of a recorded call, from the
  parameters of its module in `params` (the whole model's tree). Masked keys get exactly 0;
  a query with no visible key gets a row of zeros."""
  p = _module_params(params, call.path)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  q = jnp.einsum('bld,dhk->blhk', f32(call.inputs_q), f32(p['query_kernel']))  # [B, Lq, H, K]
  k = jnp.einsum('bnd,dhk->bnhk', f32(call.inputs_kv), f32(p['kv_kernel'][:, 0]))  # [B, N, H, K]
  if 'query_bias' in p:
    q, k = q + f32(p['query_bias']), k + f32(p['kv_bias'][0])
  logits = jnp.einsum('blhk,bnhk->bhln', q, k) / np.sqrt(q.shape[-1])  # [B, H, Lq, N]
  if call.mask is None:
    return jax.nn.softmax(logits, axis=-1)
  mask = jnp.broadcast_to(jnp.asarray(call.mask, bool), logits.shape)
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  return jnp.where(mask, probs, 0.0)  # rows without any visible key: NaN -> 0


def cross_attention_maps(model: nn.Module, params: Any, images: jax.Array,
                         text_ids: jax.Array, text_mask: jax.Array, layer: int = 0
                         ) -> tuple[np.ndarray, tuple[str, ...]]:
  """The cross-attention probabilities of a fusion model's `layer`-th cross-attention module
  (in call order; ALBEF's 'block_{layer}') for images and their texts.

  Args:
    model, params: a model whose `__call__(images, text_ids, text_mask)` runs its fusion layer
      (e.g. `FusionEncoder`), and its parameters.
    images: [B, H, W, 3] normalised; text_ids, text_mask: [B, L].
    layer: which cross-attention module; negative counts from the last.

  Returns:
    (probabilities [B, heads, L, N] float32, the module's path). Row (b, h, l) is how text
    token l of example b spreads its attention over the N image tokens (e.g. a ViT's class
    token, then its patches in row-major order).
  """
  paths = []

  def probs_of(params, images, text_ids, text_mask):  # compiled whole: one XLA program
    calls = cross_attention_calls(model, params, images, text_ids, text_mask)
    if not calls:
      raise ValueError(f'{type(model).__name__} ran no cross-attention module (a '
                       f'MultiHeadAttention named {CROSS_ATTENTION_NAME!r} with key-value '
                       "inputs); use a fusion model such as fusion.name='cross_attention'.")
    if not -len(calls) <= layer < len(calls):
      raise ValueError(f'layer={layer} is out of range: the model has {len(calls)} cross-'
                       f'attention modules ({", ".join("/".join(c.path) for c in calls)}).')
    paths.append(calls[layer].path)
    return attention_probs(calls[layer], params)

  probs = jax.jit(probs_of)(params, images, text_ids, text_mask)
  return np.asarray(probs), paths[0]


def patch_grid(weights: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits weights over image tokens [..., N] into a patch grid [..., grid, grid] (the last
  grid^2 tokens, row-major, as a ViT orders its patches) and the leading tokens
  [..., N - grid^2] (a ViT's class token)."""
  weights = np.asarray(weights)
  prefix = weights.shape[-1] - grid * grid
  if prefix < 0:
    raise ValueError(f'{weights.shape[-1]} image tokens cannot hold a {grid}x{grid} patch grid.')
  patches = weights[..., prefix:]
  return patches.reshape(*weights.shape[:-1], grid, grid), weights[..., :prefix]
