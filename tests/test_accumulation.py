"""Gradient caching over micro-batches: the loss and gradients of the whole batch, less memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.defaults import base_config
from vlm_jax.training import accumulation
from vlm_jax.training import objectives
from vlm_jax.training import step as step_lib
from vlm_jax.training import trainer

VOCAB, LENGTH = 50, 16


def small_config(loss='softmax', batch=16, microbatches=1, width=32, depth=1, dropout=0.0):
  c = base_config()
  c.model.embed_dim = 32
  for tower in (c.model.image, c.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = width, depth, 2, 2 * width
    tower.dropout = dropout
  c.model.text.vocab_size = VOCAB
  if loss == 'sigmoid':
    c.loss.name = 'sigmoid'
    c.model.temperature.update(init=2.3, bias_init=-10.0, learn_bias=True)
  c.train.batch_size, c.train.microbatches = batch, microbatches
  c.optim.warmup_steps = 0
  return c


def random_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          'text_ids': rng.integers(1, VOCAB, size=(n, LENGTH)).astype(np.int32),
          'text_mask': np.arange(LENGTH)[None] < rng.integers(3, LENGTH, size=(n, 1))}


def build(config):
  model = models.build_model(config.model, text_max_len=LENGTH)
  one = random_batch(1)
  params = model.init({'params': jax.random.key(0)}, one['image'], one['text_ids'],
                      one['text_mask'])['params']
  return model, nn.unbox(params)


def assert_trees_close(got, expected, atol=1e-5):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5),
               jax.device_get(got), jax.device_get(expected))


def test_split_takes_strided_rows_and_join_inverts_it():
  x = jnp.arange(12 * 2).reshape(12, 2)
  micro = accumulation.split_microbatches({'x': x}, 4)['x']  # [4, 3, 2]
  np.testing.assert_array_equal(micro[1], x[1::4])
  joined = accumulation.join_microbatches({'x': micro, 's': jnp.full((4,), 7.0)})
  np.testing.assert_array_equal(joined['x'], x)
  assert joined['s'].shape == () and joined['s'] == 7.0
  with pytest.raises(ValueError, match='cannot be split into 5'):
    accumulation.split_microbatches({'x': x}, 5)


def test_loss_fn_is_outputs_loss_of_embeddings():
  config = small_config('sigmoid')
  model, params = build(config)
  batch, rng = random_batch(8), jax.random.key(3)
  expected = jax.jit(objectives.make_loss_fn(model, config))(params, batch, rng)
  embed_fn = objectives.make_embed_fn(model)
  outputs_loss_fn = objectives.make_outputs_loss_fn(config)
  got = jax.jit(lambda *args: outputs_loss_fn(embed_fn(*args)))(params, batch, rng)
  assert_trees_close(got, expected, atol=0)


def _compile(fn, *args):
  """`fn` jitted and compiled for `args`, and its compiled temporary memory in bytes."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_grad_cache_equals_one_batch_in_less_memory(loss):
  config = small_config(loss, batch=128, microbatches=4)
  model, params = build(config)
  args = (params, random_batch(128), jax.random.key(1))
  one, one_bytes = _compile(
      jax.value_and_grad(objectives.make_loss_fn(model, config), has_aux=True), *args)
  four, four_bytes = _compile(accumulation.grad_fn_for(model, config), *args)
  expected, got = one(*args), four(*args)
  assert_trees_close(got, expected)
  # Temperature (and SigLIP's bias): outputs shared by all micro-batches, counted once.
  assert abs(float(expected[1]['t'])) > 1e-3
  np.testing.assert_allclose(got[1]['t'], expected[1]['t'], rtol=1e-5)
  print(f'{loss}, batch 128: compiled temp memory {one_bytes / 2**20:.1f} MiB in one batch, '
        f'{four_bytes / 2**20:.1f} MiB in 4 micro-batches')
  assert four_bytes < 0.5 * one_bytes


def test_dropout_keys_agree_between_the_two_passes():
  """With dropout, the gradient is that of the loss of the embeddings micro-batch i gets
  with key i; a second pass with other keys would not give it."""
  config = small_config(microbatches=4, dropout=0.3)
  model, params = build(config)
  batch, rng = random_batch(16), jax.random.key(2)
  embed_fn = objectives.make_embed_fn(model)
  outputs_loss_fn = objectives.make_outputs_loss_fn(config)

  def reference_loss(p):
    """Differentiated in one piece: micro-batch i embedded with key i, the loss of all."""
    micro = accumulation.split_microbatches(batch, 4)  # leaves [4, 4, ...]
    keys = jax.random.split(rng, 4)
    stacked = jax.vmap(lambda b, key: embed_fn(p, b, key))(micro, keys)
    return outputs_loss_fn(accumulation.join_microbatches(stacked))

  expected = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params)
  grad_fn = jax.jit(accumulation.grad_cache(embed_fn, outputs_loss_fn, 4))
  got = grad_fn(params, batch, rng)
  assert_trees_close(got, expected)
  other_keys = grad_fn(params, batch, jax.random.key(5))
  assert abs(float(other_keys[0][0]) - float(got[0][0])) > 1e-4  # dropout is on


def _setup_step(config):
  """Setup's shardings on the 8-device mesh, with the micro-batched step jitted there."""
  setup = trainer.Setup(config)
  grad_fn = accumulation.grad_fn_for(setup.model, config, batch_sharding=setup.batch_sharding)
  step = jax.jit(
      step_lib.make_train_step(setup.loss_fn, setup.tx, setup.schedule, setup.rules, grad_fn),
      in_shardings=(setup.state_sharding, setup.batch_sharding, setup.replicated),
      out_shardings=(setup.state_sharding, setup.replicated))
  state = setup.init_state(jax.random.key(0))
  batch = setup.device_batch(random_batch(config.train.batch_size))
  with jax.set_mesh(setup.mesh):
    return step(state, batch, jax.random.key(1))


def test_micro_batched_step_on_a_mesh_updates_like_one_batch():
  assert jax.device_count() == 8
  expected_state, expected = _setup_step(small_config(batch=64))
  state, metrics = _setup_step(small_config(batch=64, microbatches=4))  # 8 rows per device
  assert_trees_close(metrics, expected)
  assert_trees_close(state.params, expected_state.params)
  assert float(expected['learning_rate']) > 0


def test_microbatches_must_divide_the_batch():
  config = small_config(batch=16, microbatches=3)
  with pytest.raises(ValueError, match='divisor of train.batch_size=16'):
    accumulation.grad_fn_for(None, config)
  assert accumulation.grad_fn_for(None, small_config(microbatches=1)) is None
