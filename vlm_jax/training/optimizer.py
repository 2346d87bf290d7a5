"""The optax optimizer and learning-rate schedule described by `config.optim`."""
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


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping, then AdamW (decoupled, masked weight decay) or SGD with momentum."""
  schedule = make_schedule(optim, num_steps)
  if optim.name == 'adamw':
    opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=optim.b1))
  else:
    raise ValueError(f'Unknown optim.name {optim.name!r}; accepted: {OPTIMIZERS}.')
  if optim.grad_clip_norm and optim.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
  return opt, schedule
