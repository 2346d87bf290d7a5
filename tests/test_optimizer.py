"""Optimizer from config: schedule values, weight-decay mask, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.defaults import base_config
from vlm_jax.training import optimizer


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
