"""Optimizer from config: schedule values, weight-decay mask, clipping, frozen parameters
(no update, and no gradient computed)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax import models
from vlm_jax.defaults import base_config
from vlm_jax.training import accumulation
from vlm_jax.training import objectives
from vlm_jax.training import optimizer
from vlm_jax.training import trainer


def test_warmup_cosine_schedule():
  optim = base_config().optim
  optim.learning_rate, optim.warmup_steps = 1.0, 10
  schedule = optimizer.make_schedule(optim, num_steps=110)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-6)


def test_weight_decay_spares_vectors_and_scalars():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,)), 'scale': jnp.ones(()),
            'embedding': jnp.ones((3, 2))}
  assert optimizer.decay_mask(params) == {'kernel': True, 'bias': False, 'scale': False,
                                          'embedding': True}
  scanned = {'qkv_kernel': jnp.ones((2, 4, 3)), 'qkv_bias': jnp.ones((2, 3)),
             'ln': {'scale': jnp.ones((2, 4))}, 'pos_embed': jnp.ones((5, 4))}
  assert optimizer.decay_mask(scanned) == {'qkv_kernel': True, 'qkv_bias': False,
                                           'ln': {'scale': False}, 'pos_embed': False}
  optim = base_config().optim
  optim.update(dict(learning_rate=0.0, warmup_steps=0, schedule='constant', weight_decay=0.5,
                    grad_clip_norm=0.0))
  tx, _ = optimizer.make_optimizer(optim, 10)
  optim.learning_rate = 1.0
  tx, _ = optimizer.make_optimizer(optim, 10)
  zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradients: the only update is decoupled decay, lr * wd * p, on matrices only.
  np.testing.assert_allclose(updates['kernel'], -0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['bias'], 0.0)
  np.testing.assert_allclose(updates['scale'], 0.0)


def test_gradient_clipping():
  optim = base_config().optim
  optim.update(dict(name='sgd', b1=0.0, learning_rate=1.0, warmup_steps=0, schedule='constant',
                    weight_decay=0.0, grad_clip_norm=1.0))
  tx, _ = optimizer.make_optimizer(optim, 10)
  params = {'w': jnp.zeros((2,))}
  updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)


def test_unknown_names():
  optim = base_config().optim
  optim.schedule = 'cosinus'
  with pytest.raises(ValueError, match='accepted'):
    optimizer.make_schedule(optim, 10)
  optim.schedule, optim.name = 'cosine', 'adamx'
  with pytest.raises(ValueError, match='accepted'):
    optimizer.make_optimizer(optim, 10)


def _groups_params():
  return {'image_encoder': {'kernel': jnp.ones((3, 2))}, 'image_proj': {'kernel': jnp.ones((2, 2))},
          'text_encoder': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))},
          'text_proj': {'kernel': jnp.ones((2, 2))}, 't': jnp.ones(())}


def test_frozen_parameters_stay_bit_identical_and_carry_no_state():
  optim = base_config().optim
  optim.update(dict(warmup_steps=0, schedule='constant', frozen=('image',)))
  tx, _ = optimizer.make_optimizer(optim, 10)
  params = _groups_params()
  state = tx.init(params)
  trainable = sum(x.size for k, v in params.items() if not k.startswith('image')
                  for x in jax.tree.leaves(v))
  # Adam's two moments for trainable leaves only (plus step counts).
  assert 2 * trainable <= sum(x.size for x in jax.tree.leaves(state)) < 2 * trainable + 8
  for i in range(3):
    grads = jax.tree.map(lambda x: (i + 1.0) * x, params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert not np.array_equal(new['text_encoder']['kernel'], params['text_encoder']['kernel'])
    params = new
  np.testing.assert_array_equal(params['image_encoder']['kernel'], np.ones((3, 2)))
  np.testing.assert_array_equal(params['image_proj']['kernel'], np.ones((2, 2)))


def test_frozen_gradients_do_not_count_towards_clipping():
  optim = base_config().optim
  optim.update(dict(name='sgd', b1=0.0, learning_rate=1.0, warmup_steps=0, schedule='constant',
                    weight_decay=0.0, grad_clip_norm=1.0, frozen=('a',)))
  tx, _ = optimizer.make_optimizer(optim, 10)
  params = {'a': jnp.zeros((2,)), 'w': jnp.zeros((2,))}
  updates, _ = tx.update({'a': jnp.array([100.0, 0.0]), 'w': jnp.array([0.3, 0.4])},
                         tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.3, -0.4], rtol=1e-6)  # not clipped
  np.testing.assert_array_equal(updates['a'], [0.0, 0.0])


def test_lr_multipliers_scale_updates_by_first_match():
  optim = base_config().optim
  optim.update(dict(name='sgd', b1=0.0, learning_rate=1.0, warmup_steps=0, schedule='constant',
                    weight_decay=0.0, grad_clip_norm=0.0,
                    lr_multipliers=(('text_encoder/bias', 0.5), ('text', 0.1))))
  tx, _ = optimizer.make_optimizer(optim, 10)
  params = _groups_params()
  updates, _ = tx.update(params, tx.init(params), params)  # gradients of ones
  np.testing.assert_allclose(updates['text_encoder']['bias'], -0.5)
  np.testing.assert_allclose(updates['text_encoder']['kernel'], -0.1)
  np.testing.assert_allclose(updates['text_proj']['kernel'], -0.1)
  np.testing.assert_allclose(updates['image_encoder']['kernel'], -1.0)


@pytest.mark.parametrize('key,value,match', [
    ('frozen', ('imag_encoder',), "optim.frozen pattern 'imag_encoder' matches no parameter"),
    ('lr_multipliers', (('txt', 0.1),), "optim.lr_multipliers pattern 'txt'"),
    ('lr_multipliers', (('text',),), r'\(regex, factor\) pairs'),
])
def test_group_errors(key, value, match):
  optim = base_config().optim
  optim[key] = value
  with pytest.raises(ValueError, match=match):
    tx, _ = optimizer.make_optimizer(optim, 10)
    tx.init(_groups_params())


# Frozen parameters are behind stop_gradient inside the loss: zero gradients, less work.

VOCAB = 50


def _frozen_config(frozen=(), lora_rank=0, microbatches=1):
  c = base_config()
  c.model.embed_dim = 16
  for tower in (c.model.image, c.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 16, 1, 2, 32
  c.model.text.vocab_size = VOCAB
  if lora_rank:
    c.model.lora.update(rank=lora_rank, targets=('.*attn/qkv_kernel',))
  c.optim.update(dict(frozen=frozen, warmup_steps=0, schedule='constant'))
  c.train.batch_size, c.train.microbatches = 8, microbatches
  return c


def _random_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  n, size, length = c.train.batch_size, c.data.image_size, c.data.max_text_len
  return {'image': rng.normal(size=(n, size, size, 3)).astype(np.float32),
          'text_ids': rng.integers(1, VOCAB, size=(n, length)).astype(np.int32),
          'text_mask': np.arange(length)[None] < rng.integers(3, length + 1, size=(n, 1))}


def _grad_fn(model, c):
  """The drivers' gradient function: gradient caching, or value_and_grad of the loss."""
  return (accumulation.grad_fn_for(model, c)
          or jax.value_and_grad(objectives.make_loss_fn(model, c), has_aux=True))


@pytest.mark.parametrize('frozen,lora_rank,microbatches,is_frozen', [
    (('image',), 0, 1, lambda path: path.startswith('image')),
    (('image',), 0, 4, lambda path: path.startswith('image')),
    (('text_encoder/',), 0, 1, lambda path: path.startswith('text_encoder/')),
    ((), 2, 1, lambda path: not path.startswith('lora/')),  # LoRA: every base parameter
])
def test_frozen_gradients_are_zero_and_the_others_unchanged(frozen, lora_rank, microbatches,
                                                            is_frozen):
  c = _frozen_config(frozen, lora_rank, microbatches)
  model = models.build_model(c.model, text_max_len=c.data.max_text_len)
  batch = _random_batch(c)
  params = nn.unbox(model.init({'params': jax.random.key(0)}, batch['image'][:1],
                               batch['text_ids'][:1], batch['text_mask'][:1])['params'])
  rng = jax.random.key(1)
  (loss, _), grads = jax.jit(_grad_fn(model, c))(params, batch, rng)
  # Reference: value_and_grad of the dual-encoder objective, nothing stopped (gradient caching
  # of it for micro-batches, which test_accumulation checks against value_and_grad at 1e-5).
  embed_fn, outputs_loss_fn = objectives.make_embed_fn(model), objectives.make_outputs_loss_fn(c)
  plain = lambda p, b, r: outputs_loss_fn(embed_fn(p, b, r))
  plain_grad_fn = (accumulation.grad_cache(embed_fn, outputs_loss_fn, microbatches)
                   if microbatches > 1 else jax.value_and_grad(plain, has_aux=True))
  (want_loss, _), want = jax.jit(plain_grad_fn)(params, batch, rng)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  flat = {optimizer.path_name(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  flat_want = {optimizer.path_name(p): g for p, g in jax.tree_util.tree_leaves_with_path(want)}
  frozen_paths = [p for p in flat if is_frozen(p)]
  assert frozen_paths and len(frozen_paths) < len(flat)
  assert any(np.any(flat_want[p] != 0) for p in frozen_paths)  # the stop is what zeroes them
  for path, g in flat.items():
    if is_frozen(path):
      np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=path)
    else:
      np.testing.assert_allclose(g, flat_want[path], rtol=1e-6, atol=1e-6, err_msg=path)


def test_a_frozen_image_tower_takes_less_backward_work():
  def flops(frozen):
    c = _frozen_config(frozen)
    model = models.build_model(c.model, text_max_len=c.data.max_text_len)
    batch = _random_batch(c)
    params = jax.eval_shape(lambda: nn.unbox(model.init(
        {'params': jax.random.key(0)}, batch['image'][:1], batch['text_ids'][:1],
        batch['text_mask'][:1])['params']))
    compiled = jax.jit(_grad_fn(model, c)).lower(params, batch, jax.random.key(1)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  assert flops(('image',)) < 0.9 * flops(())


def test_training_with_a_frozen_tower_keeps_it_bit_identical():
  c = _frozen_config(('image',))
  setup = trainer.Setup(c, mesh=None)
  state = setup.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  rng = jax.random.key(1)
  # The gradient norm covers the trainable parameters only: the reference's at step 0.
  loss_fn = objectives.make_loss_fn(setup.model, _frozen_config())  # nothing stopped
  batch = _random_batch(c)
  want, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(before, batch, jax.random.fold_in(rng, 0))
  trainable = [g for k, v in want.items() if not k.startswith('image') for g in jax.tree.leaves(v)]
  for i in range(3):
    state, metrics = setup.step(state, setup.device_batch(_random_batch(c, seed=i)), rng)
    if i == 0:
      np.testing.assert_allclose(metrics['grad_norm'], optax.tree.norm(trainable), rtol=1e-5)
  after = jax.device_get(state.params)
  for key in before:
    same = jax.tree.leaves(jax.tree.map(np.array_equal, before[key], after[key]))
    assert all(same) if key.startswith('image') else not all(same), key
