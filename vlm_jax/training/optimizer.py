"""The optax optimizer and learning-rate schedule described by `config.optim`.

Parameter groups are named by regexes matched (`re.match`, so from the start) against
'/'-joined parameter paths such as 'image_encoder/encoder/block_0/attn/qkv_kernel':
`optim.frozen` parameters get no update and no optimizer state (LiT: `('image',)` locks
image_encoder and image_proj), and `optim.lr_multipliers` scale the updates (learning rate and
weight decay alike) of the first group a parameter matches. Frozen gradients are zeroed
before clipping, so they do not count towards the clipped norm. The trainer's loss functions
also put frozen parameters behind `stop_frozen`, so their gradients are never computed.
"""
import math
import re

import jax
import ml_collections
import optax

SCHEDULES = ('cosine', 'linear', 'constant')
OPTIMIZERS = ('adamw', 'sgd')


def make_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then `optim.schedule` down to the end factor."""
  peak, warmup = optim.learning_rate, optim.warmup_steps
  end = peak * optim.end_learning_rate_factor
  decay_steps = max(num_steps - warmup, 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_learning_rate_factor)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f'Unknown optim.schedule {optim.schedule!r}; accepted: {SCHEDULES}.')
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """True for the weight matrices that take weight decay: leaves named `*kernel` or
  `embedding`. Biases, norm scales, positions, class tokens and the temperature are spared
  (by name, not by rank: scanned layers give a LayerNorm scale two dimensions)."""
  def decays(path, _):
    name = str(getattr(path[-1], 'key', path[-1]))
    return name.endswith('kernel') or name == 'embedding'
  return jax.tree_util.tree_map_with_path(decays, params)


def path_name(path) -> str:
  """A tree path as 'a/b/c'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def is_frozen(path, frozen: tuple[str, ...]) -> bool:
  """Whether a `frozen` regex matches (`re.match`) the name of tree path `path`."""
  name = path_name(path)
  return any(re.match(p, name) for p in frozen)


def stop_frozen(params, frozen: tuple[str, ...]):
  """`params` with the leaves that `frozen` regexes match behind `jax.lax.stop_gradient`.

  Applied inside a differentiated loss (before the model runs), it makes the gradients of
  frozen leaves exact zeros and lets XLA drop the backward work only they need: the weight
  gradients of a frozen tower and, when nothing trainable comes before it, the backward
  pass through it. Gradient norms then cover the trainable parameters only.
  """
  if not frozen:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.lax.stop_gradient(x) if is_frozen(path, frozen) else x, params)


def _groups(optim: ml_collections.ConfigDict
            ) -> tuple[tuple[str, ...], tuple[tuple[str, float], ...]]:
  frozen = tuple(optim.frozen)
  multipliers = tuple(tuple(m) for m in optim.lr_multipliers)
  for pattern in frozen:
    if not isinstance(pattern, str):
      raise ValueError(f'optim.frozen takes regexes of parameter paths, got {pattern!r}.')
  for m in multipliers:
    if len(m) != 2 or not isinstance(m[0], str) or not isinstance(m[1], (int, float)):
      raise ValueError(f'optim.lr_multipliers takes (regex, factor) pairs, got {m!r}.')
  return frozen, multipliers


def param_labels(params, frozen: tuple[str, ...],
                 multipliers: tuple[tuple[str, float], ...]):
  """'frozen', 'lr_{i}' (the first multiplier whose regex matches) or 'default' per leaf.

  Raises ValueError for a regex that matches no parameter, naming the top-level groups.
  """
  paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  named = [('optim.frozen', p) for p in frozen]
  named += [('optim.lr_multipliers', p) for p, _ in multipliers]
  for what, pattern in named if any(paths) else []:  # [''] for a non-tree placeholder
    if not any(re.match(pattern, path) for path in paths):
      groups = sorted({path.split('/')[0] for path in paths})
      raise ValueError(f'{what} pattern {pattern!r} matches no parameter; parameter paths '
                       f'start with: {", ".join(groups)}.')

  def label(path, _):
    if is_frozen(path, frozen):
      return 'frozen'
    name = path_name(path)
    return next((f'lr_{i}' for i, (p, _) in enumerate(multipliers) if re.match(p, name)),
                'default')
  return jax.tree_util.tree_map_with_path(label, params)


def count_params(params, frozen: tuple[str, ...] = ()) -> tuple[int, int]:
  """(trainable, total) numbers of scalars in `params` (arrays or ShapeDtypeStructs); a leaf
  whose path a `frozen` regex matches is not trainable."""
  trainable = total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = math.prod(leaf.shape)
    total += size
    if not is_frozen(path, frozen):
      trainable += size
  return trainable, total


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   also_frozen: tuple[str, ...] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping, then AdamW (decoupled, masked weight decay) or SGD with momentum;
  with `optim.frozen` / `optim.lr_multipliers`, per parameter group (see the module doc).
  `also_frozen`: regexes frozen like `optim.frozen`'s (LoRA's: `lora.frozen_patterns`)."""
  schedule = make_schedule(optim, num_steps)
  if optim.name == 'adamw':
    opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=optim.b1))
  else:
    raise ValueError(f'Unknown optim.name {optim.name!r}; accepted: {OPTIMIZERS}.')
  frozen, multipliers = _groups(optim)
  frozen += tuple(also_frozen)
  clip = (optax.clip_by_global_norm(optim.grad_clip_norm)
          if optim.grad_clip_norm and optim.grad_clip_norm > 0 else None)
  if not frozen and not multipliers:
    return (optax.chain(clip, opt) if clip else opt), schedule
  labels = lambda params: param_labels(params, frozen, multipliers)
  transforms = {'default': opt, 'frozen': optax.set_to_zero(),
                **{f'lr_{i}': optax.chain(opt, optax.scale(m))
                   for i, (_, m) in enumerate(multipliers)}}
  grouped = optax.multi_transform(transforms, labels)
  if frozen:
    zero_frozen = optax.masked(optax.set_to_zero(),
                               lambda p: jax.tree.map(lambda l: l == 'frozen', labels(p)))
    clip = optax.chain(zero_frozen, clip) if clip else None
  return (optax.chain(clip, grouped) if clip else grouped), schedule
