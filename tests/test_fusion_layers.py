"""Fusion layers: registry, shapes, padding invariance, image dependence, partitioning names,
Flamingo's zero-gate identity, and the Q-Former against Hugging Face's Blip2QFormerModel."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import defaults, fusion
from vlm_jax.fusion import qformer
from vlm_jax.nn.attention import causal_mask, combine_masks, padding_mask
from vlm_jax.nn.transformer import EncoderBlock, layer_norm

os.environ.setdefault('HF_HUB_OFFLINE', '1')

B, L, N, DT, DI = 2, 6, 5, 16, 24  # batch, text length, image tokens, text / image widths
NAMES = ('cross_attention', 'gated_xattn', 'merged', 'qformer')
ALLOWED_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'joint', 'patch', 'layers', None}
TEXT_MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
IMAGE_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)


def _model_cfg(name, **overrides):
  c = defaults.base_config().model
  c.text.width, c.image.width = DT, DI
  c.fusion.update(name=name, width=0, depth=2, num_heads=2, mlp_dim=32, num_queries=4,
                  every=1, causal=False)
  c.fusion.update(overrides)
  return c


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, N, DI)), jax.random.normal(k2, (B, L, DT))


def _init(module, image, image_mask, text, text_mask):
  """Eager init: on CPU cheaper than compiling the many random initialisers."""
  variables = module.init(jax.random.key(1), image, image_mask, text, text_mask)
  return nn.unbox(variables)


def _shift(x, seed):
  """x plus random noise (not a constant: LayerNorms would remove that)."""
  return x + jax.random.normal(jax.random.key(seed), x.shape)


def _noise(x, mask, seed):
  """x with the positions where `mask` is False replaced by large random values."""
  noise = 10 * jax.random.normal(jax.random.key(seed), x.shape)
  return jnp.where(mask[..., None], x, noise)


def test_unknown_name_lists_the_layers():
  with pytest.raises(ValueError, match='accepted: cross_attention, gated_xattn, merged, '
                     'qformer'):
    fusion.build_fusion(_model_cfg('nope'))
  assert set(NAMES) <= set(fusion.FUSION_LAYERS)


def test_register_fusion(monkeypatch):
  monkeypatch.setattr(fusion, 'FUSION_LAYERS', dict(fusion.FUSION_LAYERS))
  dense = lambda model_cfg: nn.Dense(model_cfg.fusion.width)

  @fusion.register_fusion('dense')
  def build(model_cfg):
    return dense(model_cfg)

  assert fusion.register_fusion('dense2', dense) is dense
  assert fusion.build_fusion(_model_cfg('dense', width=8)).features == 8
  assert fusion.FUSION_LAYERS['dense'] is build


@pytest.mark.parametrize('name', NAMES)
def test_width_and_partitioning(name):
  """width 0 keeps the text width (no 'text_in'); every parameter has logical axis names."""
  image, text = _inputs()
  for width in (0, 24):
    module = fusion.build_fusion(_model_cfg(name, width=width))
    variables = jax.eval_shape(module.init, jax.random.key(0), image, None, text, TEXT_MASK)
    out = jax.eval_shape(module.apply, variables, image, None, text, TEXT_MASK)
    assert out.shape == (B, L, width or DT)
    assert ('text_in' in variables['params']) == bool(width)
    boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in boxed:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= ALLOWED_AXES


@pytest.mark.parametrize('name', NAMES)
def test_padding_invariance_and_image_dependence(name):
  """Also: dropout is live with deterministic=False."""
  image, text = _inputs()
  module = fusion.build_fusion(_model_cfg(name))
  variables = _init(module, image, IMAGE_MASK, text, TEXT_MASK)
  apply = module.apply
  out = apply(variables, image, IMAGE_MASK, text, TEXT_MASK)
  assert out.shape == (B, L, DT) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  real = TEXT_MASK[..., None]
  padded = apply(variables, _noise(image, IMAGE_MASK, 2), IMAGE_MASK,
                 _noise(text, TEXT_MASK, 3), TEXT_MASK)
  np.testing.assert_allclose(np.where(real, padded, 0), np.where(real, out, 0), atol=1e-5)
  dropped = fusion.build_fusion(_model_cfg(name, dropout=0.1)).apply(
      variables, image, IMAGE_MASK, text, TEXT_MASK, deterministic=False,
      rngs={'dropout': jax.random.key(6)})
  assert np.isfinite(np.asarray(dropped)).all() and np.abs(dropped - out).max() > 1e-3
  other = apply(variables, _shift(image, 5), IMAGE_MASK, text, TEXT_MASK)
  if name == 'gated_xattn':  # zero gates: the image is ignored at initialisation
    np.testing.assert_array_equal(other, out)
  else:
    assert np.abs(np.where(real, other - out, 0)).max() > 1e-3


def test_causal_cross_attention():
  image, text = _inputs()
  module = fusion.build_fusion(_model_cfg('cross_attention', causal=True))
  variables = _init(module, image, None, text, TEXT_MASK)
  apply = module.apply
  out = apply(variables, image, None, text, TEXT_MASK)
  later = apply(variables, image, None, text.at[:, 3:].set(_shift(text, 4)[:, 3:]), TEXT_MASK)
  np.testing.assert_allclose(later[:, :3], out[:, :3], atol=1e-6)
  assert np.abs(later[:, 3:] - out[:, 3:]).max() > 1e-3


class _LanguageModel(nn.Module):
  """The gated model without its gated blocks: EncoderBlocks 'block_{i}' and 'ln_final'."""
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, layer_norm_eps=self.layer_norm_eps,
                       name=f'block_{i}')(x, mask)
    return layer_norm(self.layer_norm_eps, jnp.float32, jnp.float32, 'ln_final')(x)


def test_gated_xattn_starts_as_the_language_model():
  cfg = _model_cfg('gated_xattn', depth=3, every=2, causal=True)
  image, text = _inputs()
  module = fusion.build_fusion(cfg)
  variables = _init(module, image, IMAGE_MASK, text, TEXT_MASK)
  params = variables['params']
  assert sorted(params) == ['block_0', 'block_1', 'block_2', 'gated_0', 'gated_2', 'ln_final']
  assert float(params['gated_0']['attn_gate']) == float(params['gated_0']['mlp_gate']) == 0.0
  apply = module.apply
  out = apply(variables, image, IMAGE_MASK, text, TEXT_MASK)

  lm = _LanguageModel(3, cfg.fusion.num_heads, cfg.fusion.mlp_dim, cfg.fusion.ln_eps)
  lm_params = {k: v for k, v in params.items() if not k.startswith('gated_')}
  mask = combine_masks(causal_mask(L), padding_mask(TEXT_MASK))
  np.testing.assert_array_equal(out, lm.apply({'params': lm_params}, text, mask))

  gates = {'attn_gate': jnp.float32(0.5), 'mlp_gate': jnp.float32(-0.5)}
  opened = {**params, **{g: {**params[g], **gates} for g in ('gated_0', 'gated_2')}}
  gated = apply({'params': opened}, image, IMAGE_MASK, text, TEXT_MASK)
  other = apply({'params': opened}, _shift(image, 5), IMAGE_MASK, text, TEXT_MASK)
  assert np.abs(gated - out).max() > 1e-3 and np.abs(other - gated).max() > 1e-3


def test_qformer_matches_hugging_face():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  q, depth, heads, width, mlp_dim, eps = 4, 3, 2, DT, 32, 1e-6
  hf_cfg = transformers.Blip2QFormerConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      intermediate_size=mlp_dim, cross_attention_frequency=2, encoder_hidden_size=DI,
      layer_norm_eps=eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      use_qformer_text_input=True)
  hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  hf = transformers.Blip2QFormerModel(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.2 * torch.randn_like(p))
  query_tokens = torch.randn(1, q, width)

  cfg = _model_cfg('qformer', depth=depth, num_heads=heads, mlp_dim=mlp_dim, every=2,
                   num_queries=q, ln_eps=eps)
  module = fusion.build_fusion(cfg)
  params = qformer.params_from_hf_state_dict(hf.state_dict(), heads,
                                             query_tokens=query_tokens)
  image, text = _inputs()
  shapes = jax.eval_shape(module.init, jax.random.key(0), image, None, text, TEXT_MASK)
  assert (jax.tree.map(lambda x: x.shape, params) ==
          jax.tree.map(lambda x: x.shape, nn.unbox(shapes)['params']))
  assert 'cross_attn' in params['layer_2'] and 'cross_attn' not in params['layer_1']

  tensor = lambda x: torch.from_numpy(np.array(x))
  with torch.no_grad():
    expected = hf(query_embeds=query_tokens.expand(B, -1, -1),
                  encoder_hidden_states=tensor(image),
                  encoder_attention_mask=tensor(IMAGE_MASK)).last_hidden_state.numpy()
    # HF cannot take an encoder_attention_mask together with text (the mask it builds has
    # the Q + L rows of the self-attention, not the Q of the cross-attention): no image mask.
    joint = hf(query_embeds=torch.cat([query_tokens.expand(B, -1, -1), tensor(text)], 1),
               query_length=q, attention_mask=tensor(np.pad(TEXT_MASK, ((0, 0), (q, 0)),
                                                            constant_values=True)),
               encoder_hidden_states=tensor(image)).last_hidden_state.numpy()
  queries = module.apply({'params': params}, image, IMAGE_MASK, method='encode_queries')
  assert queries.shape == (B, q, width)
  assert np.abs(np.asarray(queries) - expected).max() < 1e-5
  fused = module.apply({'params': params}, image, None, text, TEXT_MASK)
  real = TEXT_MASK[..., None]
  assert np.abs(np.where(real, np.asarray(fused) - joint[:, q:], 0)).max() < 1e-5
