"""Patch dropout (FLIP) in the ViT: kept counts, the class token, positions, evaluation
without dropout, and the compiled FLOPs of the image tower's train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.encoders.cost import tower_train_flops
from vlm_jax import models
from vlm_jax.defaults import base_config
from vlm_jax.encoders import ViT
from vlm_jax.encoders.vit import drop_patches, kept_patches


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _vit(**kw):
  return ViT(**{'patch_size': 4, 'width': 32, 'depth': 1, 'num_heads': 2, 'mlp_dim': 64, **kw})


def _train_apply(module):
  """Jitted training-mode forward: (variables, images, dropout key) -> (pooled, tokens)."""
  return jax.jit(lambda variables, images, rng: module.apply(
      variables, images, deterministic=False, rngs={'dropout': rng}))


@pytest.mark.parametrize('patches,fraction,kept', [
    (16, 0.0, 16), (16, 0.5, 8), (16, 0.75, 4), (10, 0.25, 7), (10, 0.35, 6), (4, 0.9, 1),
    (1, 0.5, 1)])
def test_kept_patches(patches, fraction, kept):
  assert kept_patches(patches, fraction) == kept


def test_drop_patches_keeps_prefix_and_distinct_patches_in_order():
  batch, num_patches = 6, 12
  ids = jnp.arange(1 + num_patches, dtype=jnp.float32)  # token i carries the value i
  x = jnp.broadcast_to(ids[None, :, None], (batch, 1 + num_patches, 3))
  out = np.asarray(drop_patches(jax.random.key(0), x, 0.75, num_prefix=1))
  assert out.shape == (batch, 1 + 3, 3)
  np.testing.assert_array_equal(out[:, 0], 0.0)  # the class token, first
  kept = out[:, 1:, 0]
  assert (np.diff(kept, axis=1) > 0).all()  # distinct patches, in their original order
  assert ((kept >= 1) & (kept <= num_patches)).all()
  assert len({tuple(row) for row in kept}) > 1  # each example draws its own patches
  other = np.asarray(drop_patches(jax.random.key(1), x, 0.75, num_prefix=1))
  assert not np.array_equal(other, out)


@pytest.mark.parametrize('pool,prefix', [('cls', 1), ('map', 0), ('gap', 0)])
def test_vit_drops_patches_only_in_training(pool, prefix):
  images = _normal(0, (3, 16, 16, 3))  # 16 patches
  module = _vit(pool=pool, patch_dropout=0.5)
  variables = jax.jit(module.init)(jax.random.key(1), images)
  pooled, tokens = _train_apply(module)(variables, images, jax.random.key(2))
  assert pooled.shape == (3, 32) and tokens.shape == (3, prefix + 8, 32)
  # Evaluation keeps every patch and equals the model without patch dropout.
  pooled_eval, tokens_eval = jax.jit(module.apply)(variables, images)
  assert tokens_eval.shape == (3, prefix + 16, 32)
  reference = jax.jit(_vit(pool=pool).apply)(variables, images)
  np.testing.assert_array_equal(pooled_eval, reference[0])


@pytest.mark.parametrize('posemb', ['learn', 'sincos2d'])
def test_kept_tokens_keep_their_positions(posemb):
  """With no blocks every token is LN(LN(patch + position)) alone: each kept token must
  equal the evaluation token of the same patch, and the class token the class token."""
  images = _normal(0, (4, 16, 16, 3))
  module = _vit(depth=0, posemb=posemb, ln_pre=True, patch_dropout=0.75)
  variables = jax.jit(module.init)(jax.random.key(1), images)
  _, full = jax.jit(module.apply)(variables, images)  # [B, 17, D]
  _, kept = _train_apply(module)(variables, images, jax.random.key(3))  # [B, 1 + 4, D]
  full, kept = np.asarray(full), np.asarray(kept)
  np.testing.assert_allclose(kept[:, 0], full[:, 0], atol=1e-6)
  for b in range(4):
    distances = np.abs(kept[b, 1:, None] - full[b, None, 1:]).max(-1)  # [4, 16]
    assert (distances.min(-1) < 1e-5).all()
    matches = distances.argmin(-1)
    assert len(set(matches)) == 4 and (np.diff(matches) > 0).all()


def test_patch_dropout_needs_a_dropout_rng_and_a_valid_fraction():
  images = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r'patch_dropout must be in \[0, 1\), got 1.0'):
    jax.eval_shape(_vit(patch_dropout=1.0).init, jax.random.key(0), images)
  cfg = base_config().model
  cfg.image.patch_dropout = -0.1
  with pytest.raises(ValueError, match='patch_dropout must be in'):
    models.build_image_tower(cfg)
  cfg.image.patch_dropout = 0.5
  assert models.build_image_tower(cfg).patch_dropout == 0.5


def test_patch_dropout_half_cuts_train_step_flops_by_40_percent():
  """XLA's compiled cost analysis of the image tower's forward and backward in training."""
  images = jnp.zeros((8, 32, 32, 3))  # 64 patches of 4 px
  flops = {}
  for fraction in (0.0, 0.5):
    tower = _vit(width=64, depth=2, mlp_dim=256, patch_dropout=fraction)
    flops[fraction] = tower_train_flops(tower, images)
  reduction = 1 - flops[0.5] / flops[0.0]
  assert flops[0.0] > 0 and reduction >= 0.4, (flops, reduction)
