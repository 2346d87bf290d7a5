"""LoRA (Hu et al., 2021): low-rank updates W + (alpha / rank) A B of chosen kernels.

Configured by `model.lora` (rank, alpha, targets, train_also). The base parameters keep their
paths, so `init.pretrained` loads into them and exports read them as usual; the factors live
in one more top-level subtree that mirrors those paths:

  params = {**base, 'lora': {'image_encoder': {... {'attn': {'qkv_kernel': {'a': A, 'b': B}}}}}}

`wrap(model, spec)` returns the same model (a subclass of its class, so `isinstance` checks and
`method=model.embed` keep working) whose `init` adds the factors and whose `apply` merges them
into the kernels before running the model: every `model.apply({'params': params}, ...)` call
site works unchanged, at the cost of one small matmul per target per call.

A kernel is viewed as a matrix [fan_in, fan_out] by axis role (see KERNELS); axes that are
neither are batch axes, each with its own factors: the fused q/k/v axis of 'qkv_kernel' (so
LoRA on it equals LoRA on separate q, k, v projections) and the leading 'layers' axis of
scanned layers. A is [*kernel axes but out, rank], initialised U(+-1/sqrt(fan_in)) (the
Kaiming-uniform default of Microsoft's loralib); B is [*batch axes, rank, *out axes], zero, so
an initialised LoRA model computes exactly what its base model does.

Frozen parameters: `frozen_patterns(spec)` is one `optim.frozen`-style regex that matches
every base parameter outside `train_also`; the optimizer then gives them no update and no
state. The factors are not named '*kernel', so they take no weight decay. LoRA dropout is
not implemented: the merged kernel has no separate adapter path to drop inputs on.
"""
import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

PARAMS_KEY = 'lora'
# Leaf name -> (ndim, fan-in axes, fan-out axes) of the unstacked kernel; as in the
# initialisers of vlm_jax/nn/attention.py and flax's Dense.
KERNELS = {
    'kernel': (2, (0,), (1,)),            # Dense [in, out]
    'qkv_kernel': (4, (0,), (2, 3)),      # [D, 3, H, K]; axis 1 is a batch axis
    'kv_kernel': (4, (0,), (2, 3)),       # [D, 2, H, K]
    'query_kernel': (3, (0,), (1, 2)),    # [D, H, K]
    'out_kernel': (3, (0, 1), (2,)),      # [H, K, D]
}
_ACCEPTED = ("kernels named 'kernel' (Dense [in, out]), 'qkv_kernel', 'kv_kernel', "
             "'query_kernel' or 'out_kernel' (attention), optionally stacked over scanned "
             "layers; e.g. targets=('.*attn/(qkv|out)_kernel', '.*mlp/fc[12]/kernel')")
_LETTERS = 'abcdefghijklmnopqrstuvwxy'  # einsum letters of kernel axes
_RANK = 'z'  # ... and of the rank
_SALT = 0x10A  # folded into the init key: the base parameters draw exactly as without LoRA


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """A validated `model.lora`; hashable (a field of the wrapped model)."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  train_also: tuple[str, ...] = ()

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(lora_cfg: ml_collections.ConfigDict) -> LoraSpec | None:
  """The LoraSpec of `model.lora`, or None when `rank` is 0. Raises ValueError."""
  rank = lora_cfg.rank
  if not isinstance(rank, int) or rank < 0:
    raise ValueError(f'model.lora.rank must be an integer >= 0 (0 = no LoRA), got {rank!r}.')
  if rank == 0:
    return None
  if not lora_cfg.alpha > 0:
    raise ValueError(f'model.lora.alpha must be > 0 (updates are scaled by alpha / rank), got '
                     f'{lora_cfg.alpha!r}.')
  targets, train_also = tuple(lora_cfg.targets), tuple(lora_cfg.train_also)
  if not targets:
    raise ValueError(f'model.lora.rank={rank} needs model.lora.targets: regexes of kernel '
                     f'paths; accepted: {_ACCEPTED}.')
  for what, patterns in (('targets', targets), ('train_also', train_also)):
    for p in patterns:
      if not isinstance(p, str):
        raise ValueError(f'model.lora.{what} takes regexes of parameter paths, got {p!r}.')
  return LoraSpec(rank, float(lora_cfg.alpha), targets, train_also)


def frozen_patterns(spec: LoraSpec | None) -> tuple[str, ...]:
  """`optim.frozen` regexes for a LoRA run: every base parameter not matched by `train_also`
  (the factors under 'lora/' stay trainable); () without LoRA."""
  if spec is None:
    return ()
  keep = '|'.join([f'{PARAMS_KEY}/', *(f'(?:{p})' for p in spec.train_also)])
  return (f'(?!{keep})',)


def kernel_axes(name: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(fan-in axes, fan-out axes) of kernel leaf `name` with `ndim` dims; extra leading axes
  (stacked layers) are batch axes. Raises ValueError for other leaves."""
  if name not in KERNELS or ndim < KERNELS[name][0]:
    raise ValueError(f'not a kernel LoRA takes ({name!r} with {ndim} dims)')
  base, in_axes, out_axes = KERNELS[name]
  shift = ndim - base
  return tuple(a + shift for a in in_axes), tuple(a + shift for a in out_axes)


def _subscripts(ndim: int, in_axes, out_axes) -> tuple[str, str, str]:
  """einsum subscripts of A, B and the kernel (see the module doc for the layouts)."""
  letters = _LETTERS[:ndim]
  a = ''.join(letters[i] for i in range(ndim) if i not in out_axes) + _RANK
  b = ''.join(letters[i] for i in range(ndim) if i not in in_axes and i not in out_axes)
  b += _RANK + ''.join(letters[i] for i in out_axes)
  return a, b, letters


def factor_shapes(name: str, shape: tuple[int, ...], rank: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of A and B for a kernel leaf `name` of `shape`."""
  in_axes, out_axes = kernel_axes(name, len(shape))
  sizes = dict(zip(_LETTERS, shape), **{_RANK: rank})
  a, b, _ = _subscripts(len(shape), in_axes, out_axes)
  return tuple(sizes[c] for c in a), tuple(sizes[c] for c in b)


def delta(name: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """A B laid out as kernel leaf `name` (without the alpha / rank scale)."""
  ndim = a.ndim - 1 + len(KERNELS[name][2])  # A holds every kernel axis but the out axes
  in_axes, out_axes = kernel_axes(name, ndim)
  sa, sb, sw = _subscripts(ndim, in_axes, out_axes)
  return jnp.einsum(f'{sa},{sb}->{sw}', a, b, precision=jax.lax.Precision.HIGHEST)


def _leaf_name(path: str) -> str:
  return path.rsplit('/', 1)[-1]


def _names(leaf: Any) -> tuple | None:
  return tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None


def _check_kernel(pattern: str, path: str, leaf: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
  shape = jnp.shape(nn.unbox(leaf))
  name = _leaf_name(path)
  error = ValueError(f'model.lora.targets pattern {pattern!r} matches {path!r} (shape '
                     f'{tuple(shape)}), which is not a kernel LoRA takes; accepted: {_ACCEPTED}.')
  try:
    in_axes, out_axes = kernel_axes(name, len(shape))
  except ValueError:
    raise error from None
  extra = len(shape) - KERNELS[name][0]
  names = _names(leaf)
  if extra and (names is None or any(n != 'layers' for n in names[:extra])):
    raise error  # e.g. a convolution's 4-d 'kernel'
  return in_axes, out_axes


def select_targets(params: Mapping, spec: LoraSpec) -> list[str]:
  """The '/'-joined paths of the (possibly boxed) base `params` that `spec.targets` match.
  Raises ValueError for a pattern that matches nothing or matches a non-kernel, and for a
  `train_also` pattern that matches nothing."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  groups = sorted({p.split('/')[0] for p in flat})
  for pattern in spec.train_also:
    if not any(re.match(pattern, p) for p in flat):
      raise ValueError(f'model.lora.train_also pattern {pattern!r} matches no parameter; '
                       f'parameter paths start with: {", ".join(groups)}.')
  selected = []
  for pattern in spec.targets:
    hits = [p for p in flat if re.match(pattern, p)]
    if not hits:
      raise ValueError(f'model.lora.targets pattern {pattern!r} matches no parameter (paths '
                       f'start with: {", ".join(groups)}); accepted: {_ACCEPTED}.')
    for path in hits:
      _check_kernel(pattern, path, flat[path])
    selected += [p for p in hits if p not in selected]
  return selected


def init_factors(params: Mapping, spec: LoraSpec, key: jax.Array) -> dict:
  """The 'lora' subtree for the (possibly boxed) base `params`: A random, B zero, boxed with
  the logical axis names of their kernels (the rank axis unsharded)."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  factors = {}
  for i, path in enumerate(select_targets(params, spec)):
    leaf, name = flat[path], _leaf_name(path)
    kernel = nn.unbox(leaf)
    in_axes, out_axes = kernel_axes(name, kernel.ndim)
    a_shape, b_shape = factor_shapes(name, kernel.shape, spec.rank)
    bound = 1.0 / math.sqrt(math.prod(kernel.shape[j] for j in in_axes))
    a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, kernel.dtype, -bound, bound)
    b = jnp.zeros(b_shape, kernel.dtype)
    names = _names(leaf)
    if names is not None:
      sa, sb, sw = _subscripts(kernel.ndim, in_axes, out_axes)
      axis = dict(zip(sw, names), **{_RANK: None})
      a = leaf.replace(value=a, names=tuple(axis[c] for c in sa))
      b = leaf.replace(value=b, names=tuple(axis[c] for c in sb))
    factors[f'{path}/a'], factors[f'{path}/b'] = a, b
  return traverse_util.unflatten_dict(factors, sep='/')


def split(params: Mapping) -> tuple[dict, dict]:
  """(base parameters, the 'lora' subtree) of a LoRA model's parameters."""
  if PARAMS_KEY not in params:
    raise ValueError(f"LoRA parameters need a {PARAMS_KEY!r} subtree; these have only "
                     f'{sorted(params)}. Initialise with the LoRA model (model.lora.rank > 0).')
  return {k: v for k, v in params.items() if k != PARAMS_KEY}, params[PARAMS_KEY]


def merge(params: Mapping, scale: float) -> dict:
  """Base parameters with every kernel W that has factors replaced by W + scale A B."""
  base, factors = split(params)
  flat = traverse_util.flatten_dict(base, sep='/')
  for path, ab in traverse_util.flatten_dict(factors, sep='/', is_leaf=_is_pair).items():
    w = flat[path]
    flat[path] = w + (scale * delta(_leaf_name(path), ab['a'], ab['b'])).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def _is_pair(_, node) -> bool:
  return isinstance(node, Mapping) and set(node) == {'a', 'b'}


def merge_params(params: Mapping, lora_cfg: ml_collections.ConfigDict) -> dict:
  """`params` of a model with `model.lora` = `lora_cfg`, as parameters of the base model:
  merged when rank > 0, unchanged otherwise."""
  spec = spec_from_config(lora_cfg)
  return dict(params) if spec is None else merge(params, spec.scale)


class _LoraMethods:
  """`init_with_output` and `apply` of a wrapped model (mixed in before its class)."""

  def init_with_output(self, rngs, *args, **kwargs):
    out, variables = super().init_with_output(rngs, *args, **kwargs)
    key = rngs['params'] if isinstance(rngs, Mapping) else rngs
    params = variables['params']
    factors = init_factors(params, self.lora_spec, jax.random.fold_in(key, _SALT))
    return out, {**variables, 'params': {**params, PARAMS_KEY: factors}}

  def apply(self, variables, *args, **kwargs):
    params = merge(variables['params'], self.lora_spec.scale)
    return super().apply({**variables, 'params': params}, *args, **kwargs)


@functools.cache
def _lora_class(base: type) -> type:
  namespace = {'__annotations__': {'lora_spec': LoraSpec}, 'lora_spec': None,
               '__module__': __name__, '__doc__': f'{base.__name__} with LoRA (lora.py).'}
  return type(f'Lora{base.__name__}', (_LoraMethods, base), namespace)


def wrap(model: nn.Module, spec: LoraSpec | None) -> nn.Module:
  """`model` with LoRA `spec` (see the module doc); `model` itself when `spec` is None."""
  if spec is None:
    return model
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ('parent', 'name')}
  return _lora_class(type(model))(**fields, lora_spec=spec)


def unwrap(model: nn.Module, params: Mapping) -> tuple[nn.Module, Mapping]:
  """(the base model, its merged parameters) of a wrapped model; `model` and `params`
  unchanged otherwise. For loops that apply the model many times (decoding): the factors
  are then merged once, not at every call."""
  spec = getattr(model, 'lora_spec', None)
  if spec is None:
    return model, params
  mro = type(model).__mro__
  base = mro[mro.index(_LoraMethods) + 1]
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(base)
            if f.init and f.name not in ('parent', 'name')}
  return base(**fields), merge(params, spec.scale)
