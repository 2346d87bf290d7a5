"""Collective contrastive losses on 8 CPU devices against the dense single-device losses."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import losses
from vlm_jax.defaults import base_config
from vlm_jax.training import objectives
from vlm_jax.training import partitioning

SCALE, BIAS = 10.0, -3.0


def _mesh(shape: tuple[int, int, int]):
  parallel = base_config().parallel
  parallel.mesh.update(dict(zip(partitioning.MESH_AXES, shape)))
  return partitioning.make_mesh(parallel)


# (mesh shape over ('data', 'fsdp', 'tensor'), batch axes): the default rule's
# ('data', 'fsdp') and an unusual order that checks index, gather and ring agree.
LAYOUTS = [((8, 1, 1), 'data'), ((2, 2, 2), ('data', 'fsdp')),
           ((2, 2, 2), ('tensor', 'data', 'fsdp'))]


def _embeddings(batch: int, dim: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Two [B, E] float32 arrays of unit rows, texts correlated with their images."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  img = jax.random.normal(k1, (batch, dim))
  txt = img + 1.5 * jax.random.normal(k2, (batch, dim))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return unit(img), unit(txt)


def _args(batch: int = 32, dim: int = 16):
  img, txt = _embeddings(batch, dim)
  return img, txt, jnp.float32(SCALE), jnp.float32(BIAS)


def _dense(name: str):
  return objectives._with_bias(name, losses.get_loss(name))  # pylint: disable=protected-access


def _value_and_grads(fn, args):
  """loss, metrics and the gradients w.r.t. all four arguments."""
  return jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(*args)


def _both_losses(make_fn):
  """A jitted function of the four arguments giving `_value_and_grads` of both losses."""
  fns = {name: make_fn(name) for name in ('softmax', 'sigmoid')}
  return jax.jit(lambda *args: {n: _value_and_grads(f, args) for n, f in fns.items()})


@functools.cache
def _dense_results():
  return _both_losses(_dense)(*_args())


def _assert_close(actual, expected):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
               actual, expected)


@pytest.mark.parametrize('shape,axes', LAYOUTS)
def test_shard_map_losses_and_grads_match_dense(shape, axes):
  mesh = _mesh(shape)
  results = _both_losses(lambda n: objectives.shard_mapped_contrastive(n, mesh, axes))(*_args())
  _assert_close(results, _dense_results())
  for name, ((_, metrics), grads) in results.items():
    assert 0.0 < float(metrics['i2t_accuracy']) < 1.0  # the accuracies are really compared
    assert 0.0 < float(metrics['t2i_accuracy']) < 1.0
    assert abs(float(grads[2])) > 1e-3 and (name == 'softmax' or abs(float(grads[3])) > 1e-3)


# b = 4 rows per device: block_size 1 scores 4 one-column blocks per chunk, 3 (not a
# divisor of b) two-column blocks, 4 and the default one block.
@pytest.mark.parametrize('block_size', [1, 3, 4])
def test_chunked_sigmoid_column_blocks_match_dense(block_size):
  mesh = _mesh((2, 2, 2))
  fn = objectives.shard_mapped_contrastive('sigmoid', mesh, ('data', 'fsdp'),
                                           block_size=block_size)
  results = jax.jit(lambda *args: _value_and_grads(fn, args))(*_args())
  _assert_close(results, _dense_results()['sigmoid'])


def test_chunked_sigmoid_rejects_nonpositive_block_size():
  fn = objectives.shard_mapped_contrastive('sigmoid', _mesh((8, 1, 1)), 'data', block_size=0)
  with pytest.raises(ValueError, match='block_size must be a positive integer'):
    jax.eval_shape(fn, *_args())


@pytest.mark.parametrize('name', ['softmax', 'sigmoid'])
def test_collective_losses_under_pmap(name):
  """Per-device loss equals the global loss; pmean of per-device gradients is exact."""
  args = _args()
  fn = objectives._with_bias(  # pylint: disable=protected-access
      name, functools.partial(losses.get_sharded_loss(name), axis_name='batch'))

  def device_step(img, txt, scale, bias):
    (loss, _), grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(
        img, txt, scale, bias)
    return loss, grads[:2], jax.lax.pmean(grads[2:], 'batch')

  shard = lambda x: x.reshape(8, -1, x.shape[-1])
  loss, emb_grads, scalar_grads = jax.pmap(device_step, axis_name='batch')(
      shard(args[0]), shard(args[1]), jnp.full(8, SCALE), jnp.full(8, BIAS))
  (want_loss, _), want = _dense_results()[name]
  _assert_close(loss, jnp.full(8, want_loss))
  # The local embeddings' gradients come out n times the global loss's (pmap's psum rule);
  # after the driver's pmean over devices, what reaches replicated parameters is exact.
  _assert_close([g.reshape(-1, g.shape[-1]) / 8 for g in emb_grads], list(want[:2]))
  _assert_close([g[0] for g in scalar_grads], list(want[2:]))


class _TinyDualEncoder(nn.Module):
  """A linear stand-in for the dual encoder: the same call signature and outputs."""

  @nn.compact
  def __call__(self, images, text_ids, text_mask, deterministic=True):
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    image_emb = unit(nn.Dense(8)(images.reshape(images.shape[0], -1)))
    tokens = nn.Embed(20, 8)(text_ids) * text_mask[..., None]
    text_emb = unit(nn.Dense(8)(tokens.sum(1)))
    scale = self.param('t', nn.initializers.constant(math.log(SCALE)), ())
    bias = self.param('b', nn.initializers.constant(BIAS), ())
    return dict(image_emb=image_emb, text_emb=text_emb, logit_scale=jnp.exp(scale),
                logit_bias=bias)


def _tiny_setup(name: str, batch: int = 16):
  config = base_config()
  config.loss.name = name
  model = _TinyDualEncoder()
  keys = jax.random.split(jax.random.key(0), 3)
  data = {'image': jax.random.normal(keys[0], (batch, 4, 4, 3)),
          'text_ids': jax.random.randint(keys[1], (batch, 4), 1, 20, jnp.int32),
          'text_mask': jnp.ones((batch, 4), bool)}
  params = model.init(keys[2], data['image'], data['text_ids'], data['text_mask'])['params']
  return config, model, params, data


def test_make_loss_fn_paths_agree_on_model_gradients():
  """Dense, shard_map (loss.sharded) and pmap (axis_name, pmean'd grads) objectives.

  Sigmoid only: the plumbing is the same for both losses, and both are checked against the
  dense ones above, under shard_map and pmap.
  """
  config, model, params, data = _tiny_setup('sigmoid')
  rng = jax.random.key(1)
  grad = lambda fn: jax.value_and_grad(fn, has_aux=True)
  (want_loss, _), want = jax.jit(grad(objectives.make_loss_fn(model, config)))(
      params, data, rng)

  config.loss.sharded = True
  config.loss.block_size = 1  # b = 2: two one-column blocks per ring step
  mesh = _mesh((2, 2, 2))
  sharded_fn = objectives.make_loss_fn(model, config, mesh=mesh)
  assert 'shard_map' in str(jax.make_jaxpr(sharded_fn)(params, data, rng))
  batch = NamedSharding(mesh, partitioning.batch_spec(config.parallel))
  with jax.set_mesh(mesh):
    (loss, _), grads = jax.jit(grad(sharded_fn))(params, jax.device_put(data, batch), rng)
  _assert_close((loss, grads), (want_loss, want))

  pmap_fn = objectives.make_loss_fn(model, config, axis_name='batch')
  step = lambda p, b, r: jax.lax.pmean(grad(pmap_fn)(p, b, r), 'batch')
  local = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), data)
  (loss, _), grads = jax.pmap(step, axis_name='batch', in_axes=(None, 0, None))(
      params, local, rng)
  _assert_close((loss[0], jax.tree.map(lambda g: g[0], grads)), (want_loss, want))


def test_make_loss_fn_passes_block_size_to_the_ring():
  """`loss.block_size` reaches the sigmoid ring under shard_map and pmap (0 is refused)."""
  config, model, params, data = _tiny_setup('sigmoid')
  config.loss.sharded = True
  config.loss.block_size = 0
  rng = jax.random.key(1)
  sharded_fn = objectives.make_loss_fn(model, config, mesh=_mesh((8, 1, 1)))
  with pytest.raises(ValueError, match='block_size'):
    jax.eval_shape(sharded_fn, params, data, rng)
  pmap_fn = objectives.make_loss_fn(model, config, axis_name='batch')
  local = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), data)
  with pytest.raises(ValueError, match='block_size'):
    jax.pmap(pmap_fn, axis_name='batch', in_axes=(None, 0, None))(params, local, rng)


def test_make_loss_fn_rejects_mesh_and_axis_name():
  config = base_config()
  with pytest.raises(ValueError, match='not both'):
    objectives.make_loss_fn(_TinyDualEncoder(), config, mesh=_mesh((8, 1, 1)),
                            axis_name='batch')


def test_no_sharded_version_is_a_clear_error():
  with pytest.raises(ValueError, match="'infonce' has no sharded version"):
    losses.get_sharded_loss('infonce')


def _compiled_sigmoid(batch: int, chunked: bool, dim: int = 32, block_size: int = 16):
  """The compiled per-device value+grad program of the sigmoid loss on a (data=8) mesh."""
  mesh = _mesh((8, 1, 1))
  fn = (objectives.shard_mapped_contrastive('sigmoid', mesh, 'data', block_size=block_size)
        if chunked else _dense('sigmoid'))
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                             sharding=NamedSharding(mesh, P('data')))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  grad = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)
  with jax.set_mesh(mesh):
    return jax.jit(grad).lower(emb, emb, scalar, scalar).compile()


def test_chunked_sigmoid_memory_is_linear_in_the_batch():
  """Per device, the ring holds a few [b, c] column blocks plus the [B, E] chunks it saw.

  That is O(b c + B E): at a fixed device count and block width c, linear in the global
  batch B (about 2.0x temp memory at 2x B, where [b, b] blocks gave 3.5x). The dense loss
  holds [b, B] rows, O(B^2 / n).
  """
  dim, n, c = 32, 8, 16
  temps = {}
  for batch in (512, 1024):
    b = batch // n
    chunked = _compiled_sigmoid(batch, True, dim, block_size=c)
    temps[batch] = chunked.memory_analysis().temp_size_in_bytes
    assert temps[batch] < 4 * (8 * b * c + 3 * batch * dim), (batch, temps[batch])
    hlo = chunked.as_text()
    assert f'[{b},{c}]' in hlo
    for shape in (f'[{b},{b}]', f'[{batch},{batch}]', f'[{b},{batch}]', f'[{batch},{b}]'):
      assert shape not in hlo, shape
  ratio = temps[1024] / temps[512]
  assert ratio < 2.6, (ratio, temps)
  dense = _compiled_sigmoid(1024, False, dim)
  assert dense.memory_analysis().temp_size_in_bytes > 4 * 2 * 128 * 1024
  assert '[128,1024]' in dense.as_text()
