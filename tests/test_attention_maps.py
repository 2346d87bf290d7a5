"""Cross-attention maps (`vlm_jax.inference.attention_maps`) against a NumPy forward pass of
the fusion layer from its parameters, and against the module's own output."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.fusion.cross_attention import CrossAttentionFusion
from vlm_jax.inference import attention_maps
from vlm_jax.nn.attention import MultiHeadAttention

from run_configs import tiny_config  # pylint: disable=g-bad-import-order

B, L, N, D, DI, HEADS = 2, 7, 9, 16, 12, 2
TOL = 1e-5


def perturbed(params, seed: int = 1):
  """Every parameter moved by noise: LayerNorms are no longer 1 / 0, biases no longer 0."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x + 0.3 * rng.normal(size=x.shape), np.float32),
                      nn.unbox(params))


def np_layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_softmax(logits, mask):
  logits = np.where(mask, logits, -np.inf)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(q, k, v, mask, p):
  """q [B, Lq, H, K], k and v [B, Lk, H, K], mask broadcastable to [B, H, Lq, Lk] ->
  (output [B, Lq, D], probabilities [B, H, Lq, Lk])."""
  probs = np_softmax(np.einsum('blhk,bnhk->bhln', q, k) / np.sqrt(q.shape[-1]), mask)
  out = np.einsum('bhln,bnhk->blhk', probs, v)
  return np.einsum('blhk,hkd->bld', out, p['out_kernel']) + p['out_bias'], probs


def np_cross_probs(params, text, text_mask, image, image_mask):
  """Block 0 of CrossAttentionFusion in NumPy up to its cross-attention probabilities."""
  blk = params['block_0']
  sa = blk['self_attn']
  h = np_layer_norm(text, blk['ln1'])
  qkv = np.einsum('bld,dthk->blthk', h, sa['qkv_kernel']) + sa['qkv_bias']
  out, _ = np_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                        text_mask[:, None, None, :], sa)
  x = text + out
  ca = blk['cross_attn']
  q = np.einsum('bld,dhk->blhk', np_layer_norm(x, blk['ln2']), ca['query_kernel'])
  k = np.einsum('bnd,dhk->bnhk', image, ca['kv_kernel'][:, 0])
  return np_softmax(np.einsum('blhk,bnhk->bhln', q + ca['query_bias'], k + ca['kv_bias'][0])
                    / np.sqrt(q.shape[-1]), image_mask[:, None, None, :])


@pytest.fixture(scope='module')
def fusion_case():
  """A 2-block CrossAttentionFusion with perturbed parameters, padded text and image keys."""
  fusion = CrossAttentionFusion(width=D, depth=2, num_heads=HEADS, mlp_dim=32)
  rng = np.random.default_rng(0)
  text = rng.normal(size=(B, L, D)).astype(np.float32)
  image = rng.normal(size=(B, N, DI)).astype(np.float32)
  text_mask = np.arange(L)[None] < np.array([[L], [4]])        # [B, L]
  image_mask = np.arange(N)[None] < np.array([[N], [N - 3]])   # [B, N]: 3 padding keys
  inputs = (image, image_mask, text, text_mask)
  params = perturbed(jax.jit(fusion.init)(jax.random.key(0), *inputs)['params'])
  return fusion, params, inputs


def test_probabilities_equal_numpy(fusion_case):
  fusion, params, (image, image_mask, text, text_mask) = fusion_case
  calls = attention_maps.cross_attention_calls(fusion, params, image, image_mask, text,
                                               text_mask)
  assert [c.path for c in calls] == [('block_0', 'cross_attn'), ('block_1', 'cross_attn')]
  probs = np.asarray(attention_maps.attention_probs(calls[0], params))
  assert probs.shape == (B, HEADS, L, N)
  np.testing.assert_allclose(probs, np_cross_probs(params, text, text_mask, image, image_mask),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=TOL)
  assert np.all(probs[1, :, :, N - 3:] == 0.0)  # masked image tokens get exactly nothing
  assert np.all(probs[1, :, :, :N - 3] > 0.0)


def test_probabilities_reproduce_module_output(fusion_case):
  """Block 1 (after a whole block 0): probabilities x values through the output projection
  equal what the cross-attention module itself returned."""
  fusion, params, inputs = fusion_case
  call = attention_maps.cross_attention_calls(fusion, params, *inputs)[1]
  _, state = fusion.apply({'params': params}, *inputs, mutable=['intermediates'],
                          capture_intermediates=lambda m, name: m.name == 'cross_attn')
  module_out = np.asarray(state['intermediates']['block_1']['cross_attn']['__call__'][0])
  probs = np.asarray(attention_maps.attention_probs(call, params))
  p = params['block_1']['cross_attn']
  v = np.einsum('bnd,dhk->bnhk', np.asarray(call.inputs_kv), p['kv_kernel'][:, 1]) + p['kv_bias'][1]
  out = np.einsum('bhln,bnhk->blhk', probs, v)
  out = np.einsum('blhk,hkd->bld', out, p['out_kernel']) + p['out_bias']
  np.testing.assert_allclose(out, module_out, atol=TOL, rtol=0)


@pytest.mark.slow  # builds and compiles a whole fusion model: ~10 s, 25 s on busy cores
def test_fusion_encoder_maps(tmp_path):
  config = tiny_config(str(tmp_path), 'albef_shapes')
  config.model.text.vocab_size = 40
  config.model.fusion.depth = 2
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  size, length = config.data.image_size, config.data.max_text_len
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  ids = np.tile(np.arange(length, dtype=np.int32) % 40, (2, 1))
  mask = np.arange(length)[None] < np.array([[length], [5]])
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, ids, mask)['params'])
  probs, path = attention_maps.cross_attention_maps(model, params, images, ids, mask, layer=-1)
  grid = size // config.model.image.patch_size
  assert path == ('fusion', 'block_1', 'cross_attn')
  assert probs.shape == (2, config.model.fusion.num_heads, length, 1 + grid * grid)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=TOL)
  patches, cls = attention_maps.patch_grid(probs, grid)
  assert patches.shape == probs.shape[:-1] + (grid, grid) and cls.shape == probs.shape[:-1] + (1,)
  np.testing.assert_array_equal(patches[0, 0, 0, 1], probs[0, 0, 0, 1 + grid:1 + 2 * grid])
  with pytest.raises(ValueError, match='layer=2 is out of range: the model has 2'):
    attention_maps.cross_attention_maps(model, params, images, ids, mask, layer=2)


class TextOnly(nn.Module):
  """A model whose only attention, though named cross_attn, is self-attention."""

  @nn.compact
  def __call__(self, images, text_ids, text_mask):
    del images
    x = nn.Embed(40, D)(text_ids)
    return MultiHeadAttention(HEADS, name='cross_attn')(x, mask=text_mask[:, None, None, :])


def test_model_without_cross_attention_is_refused():
  images, ids, mask = np.zeros((1, 8, 8, 3)), np.ones((1, L), np.int32), np.ones((1, L), bool)
  model = TextOnly()
  params = model.init(jax.random.key(0), images, ids, mask)['params']
  with pytest.raises(ValueError, match='ran no cross-attention module'):
    attention_maps.cross_attention_maps(model, params, images, ids, mask)
  with pytest.raises(ValueError, match='cannot hold a 5x5 patch grid'):
    attention_maps.patch_grid(np.ones((3, 17)), 5)
