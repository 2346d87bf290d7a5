"""Contrastive losses against NumPy loops, their gradients, and the registry."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import losses
from vlm_jax import models
from vlm_jax.defaults import base_config
from vlm_jax.losses import contrastive
from vlm_jax.losses import matching
from vlm_jax.training import objectives


def _embeddings(b=5, e=8, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(2, b, e)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x[0], x[1]  # float64 [B, E] each


def _np_logsumexp(row):
  m = max(row)
  return m + math.log(sum(math.exp(v - m) for v in row))


def _np_softmax_loss(img, txt, scale):
  b = len(img)
  logits = [[scale * float(np.dot(img[i], txt[j])) for j in range(b)] for i in range(b)]
  i2t = sum(_np_logsumexp(logits[i]) - logits[i][i] for i in range(b)) / b
  cols = [[logits[i][j] for i in range(b)] for j in range(b)]
  t2i = sum(_np_logsumexp(cols[j]) - cols[j][j] for j in range(b)) / b
  return (i2t + t2i) / 2


def _np_sigmoid_loss(img, txt, scale, bias, positives=None):
  b = len(img)
  total = 0.0
  for i in range(b):
    for j in range(b):
      z = 1.0 if (i == j if positives is None else positives[i][j]) else -1.0
      logit = scale * float(np.dot(img[i], txt[j])) + bias
      total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
  return total / b


def test_softmax_matches_numpy():
  img, txt = _embeddings()
  loss, metrics = jax.jit(losses.get_loss('softmax'))(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(7.5))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, _np_softmax_loss(img, txt, 7.5), rtol=1e-5)
  np.testing.assert_allclose(0.5 * (metrics['i2t_loss'] + metrics['t2i_loss']), loss,
                             rtol=1e-6)
  assert set(metrics) == {'i2t_loss', 't2i_loss', 'i2t_accuracy', 't2i_accuracy'}


def test_sigmoid_with_same_text_positives_matches_numpy():
  """Rows 0, 2 and 3 share a caption: all their pairs are positives (loss.positives)."""
  img, txt = _embeddings(b=5)
  ids = jnp.asarray([[1, 7, 2, 0], [1, 8, 2, 0], [1, 7, 2, 0], [1, 7, 2, 0], [1, 7, 9, 2]])
  positives = matching.identical_rows(ids, ids > 0)
  expected = [[i == j or {i, j} <= {0, 2, 3} for j in range(5)] for i in range(5)]
  np.testing.assert_array_equal(positives, expected)
  loss, _ = jax.jit(losses.sigmoid_contrastive)(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(4.0),
      jnp.float32(-1.5), positives)
  np.testing.assert_allclose(loss, _np_sigmoid_loss(img, txt, 4.0, -1.5, expected), rtol=1e-5)
  diagonal, _ = losses.sigmoid_contrastive(jnp.asarray(img), jnp.asarray(txt), 4.0, -1.5)
  assert abs(float(diagonal) - float(loss)) > 1e-3


def test_same_text_positives_are_refused_where_unsupported():
  config = base_config()
  config.loss.positives = 'same_text'
  with pytest.raises(ValueError, match="loss.name='sigmoid'"):
    objectives.make_outputs_loss_fn(config)
  config.loss.name = 'sigmoid'
  with pytest.raises(ValueError, match='microbatches=1'):
    config.train.microbatches = 2
    objectives.make_outputs_loss_fn(config)
  config.train.microbatches = 1
  with pytest.raises(ValueError, match='parallel.mode'):
    objectives.make_outputs_loss_fn(config, axis_name='batch')
  config.loss.positives = 'identical'
  with pytest.raises(ValueError, match='same_text'):
    objectives.make_outputs_loss_fn(config)


def test_same_label_positives_add_one_object_images_of_a_class():
  """Rows 1 and 3 are one-object images of class 4, row 0 of class 2, rows 2 and 4 have two
  objects (label -1): (1, 3) and (3, 1) become positives; -1 never matches -1."""
  ids = jnp.asarray([[1, 7, 2], [1, 8, 2], [1, 9, 2], [1, 5, 2], [1, 6, 2]])
  batch = {'text_ids': ids, 'text_mask': ids > 0, 'label': jnp.asarray([2, 4, -1, 4, -1])}
  expected = np.eye(5, dtype=bool)
  expected[1, 3] = expected[3, 1] = True
  np.testing.assert_array_equal(objectives.positive_pairs(batch, 'same_label'), expected)
  np.testing.assert_array_equal(objectives.positive_pairs(batch, 'same_text'), np.eye(5))
  config = base_config()
  config.loss.name, config.loss.positives = 'sigmoid', 'same_label'
  with pytest.raises(ValueError, match='data.labels=True'):
    objectives.make_outputs_loss_fn(config)


def test_softmax_perfect_match_accuracy():
  img = np.eye(4, 8)
  loss, metrics = losses.softmax_contrastive(jnp.asarray(img), jnp.asarray(img), 100.0)
  assert metrics['i2t_accuracy'] == 1.0 and metrics['t2i_accuracy'] == 1.0
  assert loss < 1e-6


@pytest.mark.parametrize('scale,bias', [(10.0, -10.0), (3.0, 0.5)])
def test_sigmoid_matches_numpy(scale, bias):
  img, txt = _embeddings(b=6)
  loss, metrics = jax.jit(losses.get_loss('sigmoid'))(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), scale, bias)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, _np_sigmoid_loss(img, txt, scale, bias), rtol=1e-5)
  np.testing.assert_allclose(metrics['pos_loss'] + metrics['neg_loss'], loss, rtol=1e-6)


def _finite_difference_grad(fn, x, eps=1e-6):
  grad = np.zeros_like(x)
  for index in np.ndindex(*x.shape):
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    grad[index] = (fn(up) - fn(down)) / (2 * eps)
  return grad


@pytest.mark.parametrize('name', ['softmax', 'sigmoid'])
def test_gradients_match_finite_differences(name):
  img, txt = _embeddings(b=4, e=3, seed=1)
  scale, bias = 5.0, -2.0
  if name == 'softmax':
    np_loss = lambda i, t, s: _np_softmax_loss(i, t, s)
    jax_loss = lambda i, t, s: losses.softmax_contrastive(i, t, s)[0]
  else:
    np_loss = lambda i, t, s: _np_sigmoid_loss(i, t, s, bias)
    jax_loss = lambda i, t, s: losses.sigmoid_contrastive(i, t, s, bias)[0]
  grads = jax.grad(jax_loss, argnums=(0, 1, 2))(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(scale))
  np.testing.assert_allclose(grads[0], _finite_difference_grad(
      lambda i: np_loss(i, txt, scale), img), atol=1e-5)
  np.testing.assert_allclose(grads[1], _finite_difference_grad(
      lambda t: np_loss(img, t, scale), txt), atol=1e-5)
  np.testing.assert_allclose(grads[2], _finite_difference_grad(
      lambda s: np_loss(img, txt, float(s[()])), np.array(scale)), atol=1e-5)


def test_bfloat16_inputs_give_float32_loss():
  img, txt = _embeddings()
  loss, _ = losses.softmax_contrastive(jnp.asarray(img, jnp.bfloat16),
                                       jnp.asarray(txt, jnp.bfloat16), jnp.float32(10.0))
  assert loss.dtype == jnp.float32


def test_sigmoid_loss_at_init_equals_numpy():
  """A SigLIP-initialised tiny model (scale 10, bias -10): loss equals the NumPy formula."""
  c = base_config().model
  c.embed_dim = 16
  c.image.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, pool='map',
                      posemb='sincos2d'))
  c.text.update(dict(vocab_size=30, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.temperature.update(dict(init=math.log(10.0), max=math.log(1e4), bias_init=-10.0,
                            learn_bias=True))
  model = models.build_model(c, text_max_len=5)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  ids = jax.random.randint(jax.random.key(1), (4, 5), 1, 30, jnp.int32)
  mask = jnp.ones((4, 5), bool)
  variables = jax.jit(model.init)(jax.random.key(2), images, ids, mask)
  out = jax.jit(model.apply)(variables, images, ids, mask)
  loss, _ = losses.get_loss('sigmoid')(out['image_emb'], out['text_emb'], out['logit_scale'],
                                       out['logit_bias'])
  img, txt = np.asarray(out['image_emb'], np.float64), np.asarray(out['text_emb'], np.float64)
  np.testing.assert_allclose(loss, _np_sigmoid_loss(img, txt, 10.0, -10.0), rtol=1e-5)


def test_positive_mask_offset():
  mask = contrastive.positive_mask(2, 6, offset=2)
  np.testing.assert_array_equal(np.argwhere(mask), [[0, 2], [1, 3]])


def test_registry():
  assert losses.available_losses() == ('sigmoid', 'softmax')
  assert losses.get_loss('softmax') is losses.softmax_contrastive
  with pytest.raises(ValueError, match="Unknown loss 'infonce'; accepted: sigmoid, softmax"):
    losses.get_loss('infonce')
  with pytest.raises(ValueError, match='already registered'):
    losses.register_loss('softmax', losses.sigmoid_contrastive)
