"""Fused (cuDNN) attention against the XLA einsum path: agreement and speed at a tower's shapes.

  python -m experiments.benchmarks.attention [--batch=256 --length=197 --heads=12
      --head_dim=64 --dtype=bfloat16 --causal=false] [--out=FILE.json]

`vlm_jax.nn.attention.token_major_attention` runs `cudnn_attention` on GPU where cuDNN takes
the shapes, and `head_major_attention` (einsums, float32 scores) elsewhere. This times the
forward and backward pass (the gradient of sum(out * cotangent) for q, k and v) of both on
[B, L, H, K] inputs, reports the largest differences of their outputs and gradients, and
whether the compiled fused program really holds a cuDNN call. Without a GPU (or on shapes
cuDNN rejects) the fused columns are null.
"""
import json
import sys

from absl import app
from absl import flags

from experiments.benchmarks import timing

_BATCH = flags.DEFINE_integer('batch', 256, 'B.', lower_bound=1)
_LENGTH = flags.DEFINE_integer('length', 197, 'L (ViT-B/16 at 224 px: 197 with the class '
                               'token).', lower_bound=1)
_HEADS = flags.DEFINE_integer('heads', 12, 'H.', lower_bound=1)
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'K.', lower_bound=1)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'],
                           'Input dtype.')
_CAUSAL = flags.DEFINE_bool('causal', False, 'Causal mask (a text tower).')
_RUNS = flags.DEFINE_integer('runs', 20, 'Timed calls (the median is reported).', lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Write the results as flat JSON to this file.')


def _value_and_grad(attend, mask):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(q, k, v, cotangent):
    out = attend(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def compare(batch: int, length: int, heads: int, head_dim: int, dtype: str, causal: bool,
            runs: int) -> dict:
  """The module docstring's metrics, as one flat dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vlm_jax.nn import attention  # pylint: disable=g-import-not-at-top

  shape = (batch, length, heads, head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, shape, jnp.dtype(dtype)) for key in keys[:3])
  cotangent = jax.random.normal(keys[3], shape, jnp.float32)
  mask = attention.causal_mask(length) if causal else None
  args = (q, k, v, cotangent)
  results = {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
             'batch': batch, 'length': length, 'heads': heads, 'head_dim': head_dim,
             'dtype': dtype, 'causal': causal}
  # One attention's FLOPs, forward and backward: 2 products of 2 B H L^2 K forward, 4 back.
  flops = 12 * batch * heads * length ** 2 * head_dim
  step = _value_and_grad(attention.einsum_token_major_attention, mask)
  (_, ref_out), ref_grads = step(*args)
  seconds = timing.median_seconds(lambda: jax.block_until_ready(step(*args)), runs)
  results.update(einsum_ms=seconds * 1e3, einsum_tflops=flops / seconds / 1e12)
  fused = {'fused_ms': None, 'fused_tflops': None, 'fused_has_cudnn_call': None,
           'max_abs_diff_out': None, 'max_abs_diff_grad': None}

  def fused_path(q, k, v, mask):
    out = attention.cudnn_attention(q, k, v, mask)
    if out is None:  # cuDNN declined these shapes under differentiation
      raise NotImplementedError('cudnn_attention does not apply in training here')
    return out

  fused['fused_error'] = None
  if attention.cudnn_attention(q, k, v, mask) is None:
    fused['fused_error'] = 'cudnn_attention does not apply (no GPU, dtype or shapes)'
  else:
    try:
      fused.update(_fused_metrics(_value_and_grad(fused_path, mask), args, ref_out, ref_grads,
                                  flops, runs))
    except NotImplementedError as e:
      fused['fused_error'] = str(e)
  results.update(fused)
  return results


def _fused_metrics(step, args, ref_out, ref_grads, flops, runs) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  text = step.lower(*args).compile().as_text()
  (_, out), grads = step(*args)
  seconds = timing.median_seconds(lambda: jax.block_until_ready(step(*args)), runs)
  diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  return dict(fused_ms=seconds * 1e3, fused_tflops=flops / seconds / 1e12,
              fused_has_cudnn_call='cudnn' in text.lower(),
              max_abs_diff_out=diff(out, ref_out),
              max_abs_diff_grad=max(diff(a, b) for a, b in zip(grads, ref_grads)))


def main(argv):
  del argv
  results = compare(_BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value, _DTYPE.value,
                    _CAUSAL.value, _RUNS.value)
  width = max(map(len, results))
  print('\n'.join(f'{k.ljust(width)}  {v:.4g}' if isinstance(v, float) else
                  f'{k.ljust(width)}  {v}' for k, v in results.items()))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main, argv=sys.argv)
