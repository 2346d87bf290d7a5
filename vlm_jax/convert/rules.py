"""Name-and-layout rules between Hugging Face tensors and our parameter trees, both ways.

A `Rule` ties some of our parameters (by '/'-joined path) to some Hugging Face tensors (by
name) with a function each way; every rule here is exact (transposes, reshapes, splits), so
export after import gives back the same bits. `to_params` and `to_tensors` apply a list of
rules and refuse anything left over or missing, naming it.
"""
import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: tuple[str, ...]                    # paths in our tree, 'text_encoder/token_embed/...'
  hf: tuple[str, ...]                      # Hugging Face tensor names
  to_ours: Callable[..., Arrays]           # (*hf arrays) -> ours arrays
  to_hf: Callable[..., Arrays]             # (*ours arrays) -> hf arrays


def copy(ours: str, hf: str) -> Rule:
  return Rule((ours,), (hf,), lambda x: (x,), lambda x: (x,))


def squeeze(ours: str, hf: str, leading: int = 1) -> Rule:
  """Ours without the `leading` size-1 axes of the Hugging Face tensor ([1, 1, D] -> [D])."""
  return Rule((ours,), (hf,), lambda x: (x.reshape(x.shape[leading:]),),
              lambda x: (x.reshape((1,) * leading + x.shape),))


def linear(ours: str, hf: str, bias: bool = True) -> list[Rule]:
  """nn.Linear weight [out, in] (+ bias) <-> Dense kernel [in, out] (+ bias)."""
  rules = [Rule((f'{ours}/kernel',), (f'{hf}.weight',), lambda w: (w.T,), lambda k: (k.T,))]
  return rules + ([copy(f'{ours}/bias', f'{hf}.bias')] if bias else [])


def layer_norm(ours: str, hf: str, weight: str = 'weight', bias: str = 'bias') -> list[Rule]:
  return [copy(f'{ours}/scale', f'{hf}.{weight}'), copy(f'{ours}/bias', f'{hf}.{bias}')]


def conv(ours: str, hf: str, bias: bool) -> list[Rule]:
  """Conv2d weight [D, C, p, p] <-> Conv kernel [p, p, C, D]."""
  rules = [Rule((f'{ours}/kernel',), (f'{hf}.weight',),
                lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),))]
  return rules + ([copy(f'{ours}/bias', f'{hf}.bias')] if bias else [])


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """Linear weight [H K, D] -> kernel [D, H, K]."""
  return w.T.reshape(w.shape[1], heads, -1)


def _heads_out(k: np.ndarray) -> np.ndarray:
  """Kernel [D, H, K] -> linear weight [H K, D]."""
  return k.reshape(k.shape[0], -1).T


def fused(ours: str, hf: tuple[str, ...], heads: int) -> list[Rule]:
  """n separate projections (q, k, v) [H K, D] <-> our fused kernel [D, n, H, K] and bias
  [n, H, K]; `hf` are the n module prefixes (with '.weight' and '.bias')."""
  n = len(hf)
  kernel = Rule(
      (f'{ours}_kernel',), tuple(f'{h}.weight' for h in hf),
      lambda *ws: (np.stack([_heads_in(w, heads) for w in ws], axis=1),),
      lambda k: tuple(_heads_out(k[:, i]) for i in range(n)))
  bias = Rule(
      (f'{ours}_bias',), tuple(f'{h}.bias' for h in hf),
      lambda *bs: (np.stack([b.reshape(heads, -1) for b in bs]),),
      lambda b: tuple(b[i].reshape(-1) for i in range(n)))
  return [kernel, bias]


def attention(ours: str, q: str, k: str, v: str, out: str, heads: int) -> list[Rule]:
  """Self-attention: q, k, v, out nn.Linear prefixes <-> our MultiHeadAttention `ours`."""
  return fused(f'{ours}/qkv', (q, k, v), heads) + out_proj(ours, out, heads)


def out_proj(ours: str, hf: str, heads: int) -> list[Rule]:
  """Output nn.Linear [D, H K] <-> out_kernel [H, K, D] and out_bias [D]."""
  kernel = Rule((f'{ours}/out_kernel',), (f'{hf}.weight',),
                lambda w: (w.T.reshape(heads, -1, w.shape[0]),),
                lambda k: (k.reshape(-1, k.shape[-1]).T,))
  return [kernel, copy(f'{ours}/out_bias', f'{hf}.bias')]


def torch_mha_cross(ours: str, hf: str, heads: int) -> list[Rule]:
  """torch nn.MultiheadAttention (in_proj_weight [3 D, D] stacking q, k, v) <-> our
  cross-attention: query_kernel [D, H, K], kv_kernel [D, 2, H, K] and their biases."""
  def weights_to_ours(w):
    q, k, v = np.split(w, 3)
    return _heads_in(q, heads), np.stack([_heads_in(k, heads), _heads_in(v, heads)], axis=1)

  def weights_to_hf(query, kv):
    return (np.concatenate([_heads_out(query), _heads_out(kv[:, 0]), _heads_out(kv[:, 1])]),)

  def biases_to_ours(b):
    q, k, v = np.split(b, 3)
    return q.reshape(heads, -1), np.stack([k.reshape(heads, -1), v.reshape(heads, -1)])

  def biases_to_hf(query, kv):
    return (np.concatenate([query.reshape(-1), kv[0].reshape(-1), kv[1].reshape(-1)]),)

  return [Rule((f'{ours}/query_kernel', f'{ours}/kv_kernel'), (f'{hf}.in_proj_weight',),
               weights_to_ours, weights_to_hf),
          Rule((f'{ours}/query_bias', f'{ours}/kv_bias'), (f'{hf}.in_proj_bias',),
               biases_to_ours, biases_to_hf),
          *out_proj(ours, f'{hf}.out_proj', heads)]


def mlp(ours: str, fc1: str, fc2: str) -> list[Rule]:
  return linear(f'{ours}/fc1', fc1) + linear(f'{ours}/fc2', fc2)


# --- Trees -----------------------------------------------------------------------------------

def flatten(tree: Mapping, prefix: str = '') -> dict[str, object]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + '/'))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _listing(names: Iterable[str], limit: int = 8) -> str:
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


class ConversionError(ValueError):
  """Tensors and parameters do not correspond (a wrong family, or an unsupported option)."""


def to_params(rules: list[Rule], tensors: Mapping[str, np.ndarray],
              expected: Mapping[str, tuple[int, ...]], ignore: tuple[str, ...] = (),
              what: str = 'checkpoint') -> dict:
  """Hugging Face tensors -> our nested parameter dict (float32 numpy arrays).

  Args:
    rules: the family's rules for this config.
    tensors: name -> array, as read from the safetensors file(s).
    expected: our '/'-joined parameter path -> shape (from `jax.eval_shape` of the model).
    ignore: regexes (re.fullmatch) of tensors that are not parameters of ours (buffers).
    what: the source, for error messages.
  """
  used, flat = set(), {}
  missing = [n for r in rules for n in r.hf if n not in tensors]
  if missing:
    raise ConversionError(f'{what} lacks tensors {_listing(missing)} that this config needs.')
  for rule in rules:
    arrays = rule.to_ours(*(np.asarray(tensors[n], np.float32) for n in rule.hf))
    flat.update(zip(rule.ours, arrays))
    used.update(rule.hf)
  extra = [n for n in tensors if n not in used and not any(re.fullmatch(p, n) for p in ignore)]
  if extra:
    raise ConversionError(f'{what} has tensors that the converted model would drop: '
                          f'{_listing(extra)}. Its architecture has an option the converter '
                          'does not support.')
  _check_shapes(flat, expected)
  return unflatten(flat)


def _check_shapes(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]):
  unknown, absent = set(flat) - set(expected), set(expected) - set(flat)
  if unknown or absent:
    raise ConversionError(f'Converted parameters do not match the model: unexpected '
                          f'{_listing(unknown) or "none"}; missing {_listing(absent) or "none"}.')
  wrong = [f'{p} {tuple(flat[p].shape)} vs {tuple(expected[p])}' for p in sorted(flat)
           if tuple(flat[p].shape) != tuple(expected[p])]
  if wrong:
    raise ConversionError(f'Converted parameter shapes differ from the model\'s: '
                          f'{"; ".join(wrong[:5])}.')


def to_tensors(rules: list[Rule], params: Mapping) -> dict[str, np.ndarray]:
  """Our nested parameter dict -> Hugging Face tensors (contiguous float32 numpy arrays)."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  covered = {p for r in rules for p in r.ours}
  if set(flat) != covered:
    raise ConversionError(f'Parameters and export rules differ: not exported '
                          f'{_listing(set(flat) - covered) or "none"}; absent '
                          f'{_listing(covered - set(flat)) or "none"}.')
  tensors = {}
  for rule in rules:
    arrays = rule.to_hf(*(flat[p] for p in rule.ours))
    tensors.update((n, np.array(a, order='C')) for n, a in zip(rule.hf, arrays))
  return tensors
