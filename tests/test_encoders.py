"""Image and text towers: shapes, masks, pooling positions, readable errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.encoders import TextTransformer, ViT


def _vit(**kw):
  return ViT(**{'patch_size': 8, 'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64, **kw})


def _text(**kw):
  return TextTransformer(**{'vocab_size': 50, 'max_len': 8, 'width': 32, 'depth': 2,
                            'num_heads': 2, 'mlp_dim': 64, **kw})


@pytest.mark.parametrize('kw,tokens', [
    (dict(pool='cls', posemb='learn', ln_pre=True, patch_bias=False,
          activation='quick_gelu'), 1 + 4 * 2),
    (dict(pool='map', posemb='sincos2d'), 4 * 2),
    (dict(pool='gap', posemb='learn', scan_layers=True, remat='full'), 4 * 2),
])
def test_vit_shapes(kw, tokens):
  images = jnp.zeros((3, 32, 16, 3))  # non-square: 4 x 2 patches
  module = _vit(**kw)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  (pooled, x) = jax.eval_shape(module.apply, variables, images)
  assert pooled.shape == (3, 32) and x.shape == (3, tokens, 32)
  params = nn.unbox(variables)['params']
  assert ('patch_embed' in params) and ('bias' in params['patch_embed']) == kw.get(
      'patch_bias', True)
  assert ('ln_pre' in params) == kw.get('ln_pre', False)
  assert ('cls_token' in params) == (kw['pool'] == 'cls')
  assert ('pos_embed' in params) == (kw['posemb'] == 'learn')
  assert ('map_head' in params) == (kw['pool'] == 'map')


def test_vit_runs_and_cls_pool_is_first_token():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  module = _vit(ln_pre=True)
  variables = jax.jit(module.init)(jax.random.key(1), images)
  pooled, x = jax.jit(module.apply)(variables, images)
  np.testing.assert_array_equal(pooled, x[:, 0])
  assert np.isfinite(np.asarray(x)).all()


def test_vit_posemb_grid_is_stored_once_and_resized():
  module = _vit(posemb_grid=4)  # 4 x 4 patches of 8 px: 32 px
  big, small = jnp.ones((1, 32, 32, 3)), jnp.ones((1, 16, 24, 3))
  variables = jax.jit(module.init)(jax.random.key(0), big)
  assert nn.unbox(variables)['params']['pos_embed'].shape == (1 + 16, 32)
  _, x = jax.jit(module.apply)(variables, small)  # a 2 x 3 grid: positions resized
  assert x.shape == (1, 1 + 6, 32) and np.isfinite(np.asarray(x)).all()
  # At the stored grid nothing is resized: the same as positions made for that size.
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, big)[1],
                                jax.jit(_vit().apply)(variables, big)[1])


@pytest.mark.parametrize('shape,match', [
    ((2, 32, 32, 1), r'\[batch, height, width, 3\]'),
    ((2, 3, 32, 32), r'\[batch, height, width, 3\]'),
    ((32, 32, 3), r'\[batch, height, width, 3\]'),
    ((2, 30, 32, 3), 'not divisible by the patch size 8'),
])
def test_vit_bad_image_shape(shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_vit().init, jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize('kw,match', [(dict(pool='max'), "pool 'max'; accepted: cls, map, gap"),
                                      (dict(posemb='rope'), 'accepted: learn, sincos2d')])
def test_vit_unknown_option(kw, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_vit(**kw).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def _text_inputs():
  ids = jnp.array([[5, 6, 7, 2, 0, 0], [5, 9, 9, 9, 8, 2]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  return ids, mask


def _init_apply(module, ids, mask):
  variables = jax.jit(module.init)(jax.random.key(0), ids, mask)
  return variables, jax.jit(module.apply)


def test_text_shapes_and_eot_pool():
  ids, mask = _text_inputs()
  module = _text()
  variables, apply = _init_apply(module, ids, mask)
  pooled, x = apply(variables, ids, mask)
  assert pooled.shape == (2, 32) and x.shape == (2, 6, 32)
  eos = np.asarray(mask).sum(-1) - 1  # the EOS is the last real token
  np.testing.assert_array_equal(pooled, np.asarray(x)[np.arange(2), eos])
  cls, x_cls = jax.jit(_text(pool='cls').apply)(variables, ids, mask)
  np.testing.assert_array_equal(cls, x_cls[:, 0])


@pytest.mark.parametrize('causal', [True, False])
def test_text_padding_ids_do_not_matter(causal):
  ids, mask = _text_inputs()
  variables, apply = _init_apply(_text(causal=causal), ids, mask)
  pooled, x = apply(variables, ids, mask)
  pooled2, x2 = apply(variables, jnp.where(mask, ids, 17), mask)
  np.testing.assert_allclose(x2[0, :4], x[0, :4], atol=1e-6)
  np.testing.assert_allclose(pooled2, pooled, atol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_text_later_tokens(causal):
  """Causal: position i ignores later tokens; bidirectional: it sees them."""
  ids, mask = _text_inputs()
  variables, apply = _init_apply(_text(causal=causal), ids, mask)
  _, x = apply(variables, ids, mask)
  _, x2 = apply(variables, ids.at[:, 3:].set(11), mask)
  if causal:
    np.testing.assert_allclose(x2[:, :3], x[:, :3], atol=1e-6)
  else:
    assert not np.allclose(x2[:, :3], x[:, :3], atol=1e-4)


def test_text_errors():
  ids, mask = _text_inputs()
  with pytest.raises(ValueError, match='exceeds the 4 learned positions'):
    jax.eval_shape(_text(max_len=4).init, jax.random.key(0), ids, mask)
  with pytest.raises(ValueError, match="accepted: eot, cls, mean, last"):
    jax.eval_shape(_text(pool='max').init, jax.random.key(0), ids, mask)


def test_text_scan_remat_shapes():
  ids, mask = _text_inputs()
  module = _text(scan_layers=True, remat='dots_saveable')
  variables = jax.eval_shape(module.init, jax.random.key(0), ids, mask)
  pooled, x = jax.eval_shape(module.apply, variables, ids, mask)
  assert pooled.shape == (2, 32) and x.shape == (2, 6, 32)
  blocks = nn.unbox(variables)['params']['encoder']['blocks']
  assert blocks['mlp']['fc1']['kernel'].shape == (2, 32, 64)


@pytest.mark.parametrize('pool', ['eot', 'cls', 'last', 'mean'])
@pytest.mark.parametrize('post_ln', [False, True])
def test_text_pooled_only_equals_full_pool(pool, post_ln):
  ids, mask = _text_inputs()
  module = _text(pool=pool, post_ln=post_ln)
  variables, apply = _init_apply(module, ids, mask)
  pooled, _ = apply(variables, ids, mask)
  fast, tokens = jax.jit(module.apply, static_argnames='pooled_only')(
      variables, ids, mask, pooled_only=True)
  assert (tokens is None) == (pool != 'mean')  # the mean reads every row
  np.testing.assert_allclose(fast, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kw', [dict(pool='cls'), dict(pool='cls', patch_dropout=0.5),
                                dict(pool='gap')])
def test_vit_pooled_only_equals_full_pool(kw):
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  module = _vit(**kw)
  variables = jax.jit(module.init)(jax.random.key(1), images)
  rngs = {'dropout': jax.random.key(2)}
  apply = jax.jit(module.apply, static_argnames=('deterministic', 'pooled_only'))
  pooled, _ = apply(variables, images, deterministic=False, rngs=rngs)
  fast, tokens = apply(variables, images, deterministic=False, pooled_only=True, rngs=rngs)
  assert (tokens is None) == (kw['pool'] == 'cls')
  np.testing.assert_allclose(fast, pooled, atol=1e-5, rtol=1e-5)
