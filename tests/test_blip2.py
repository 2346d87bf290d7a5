"""BLIP-2: the three Q-Former masks, the stage-1 losses, the causal LM and the stage-2 model's
cached decoding, and the chain CLIP -> stage 1, LM -> stage 2 through the trainer (frozen
parts bit-identical, parameter counts, evaluation, generation)."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import test_coca as coca_test
from run_configs import REPO, tiny_config
from vlm_jax import cli
from vlm_jax import models
from vlm_jax.convert import rules as R
from vlm_jax.data import datasets
from vlm_jax.eval import runner
from vlm_jax.losses import blip2 as blip2_losses
from vlm_jax.models.blip2_qformer import attention_mask
from vlm_jax.training import objectives
from vlm_jax.training import pretrained
from vlm_jax.training import trainer

VOCAB, LENGTH = coca_test.VOCAB, coca_test.LENGTH


def config_of(name, **model):
  path = os.path.join(REPO, 'configs', f'{name}.py:tiny')
  c = cli._load_config_file(path)  # pylint: disable=protected-access
  c.model.text.vocab_size = VOCAB
  c.model.update(model)
  return c


def init(config):
  """A model of `config` with every parameter perturbed (unboxed), random images and ids."""
  model, params, images, ids = coca_test.init(config)
  return model, nn.unbox(params), images, ids


# Two queries (q), three text positions (t) of which the last is padding: rows attend to
# columns. Built by hand from the paper's Figure 2.
_ = 0
EXPECTED_MASKS = {
    'bidirectional': [[1, 1, 1, 1, _],   # q0 sees everything real
                      [1, 1, 1, 1, _],
                      [1, 1, 1, 1, _],   # t0 too
                      [1, 1, 1, 1, _],
                      [1, 1, 1, 1, _]],
    'unimodal': [[1, 1, _, _, _],        # queries see queries
                 [1, 1, _, _, _],
                 [_, _, 1, 1, _],        # text sees (real) text
                 [_, _, 1, 1, _],
                 [_, _, 1, 1, _]],
    'causal': [[1, 1, _, _, _],          # queries see queries only
               [1, 1, _, _, _],
               [1, 1, 1, _, _],          # t0 sees the queries and itself
               [1, 1, 1, 1, _],          # t1 the queries, t0 and itself
               [1, 1, 1, 1, _]],         # the padding position: not a key for anyone
}


# ... and the last column when that position is a real token (the second example).
REAL_LAST_COLUMN = {'bidirectional': [1, 1, 1, 1, 1], 'unimodal': [_, _, 1, 1, 1],
                    'causal': [_, _, _, _, 1]}


@pytest.mark.parametrize('kind', sorted(EXPECTED_MASKS))
def test_masks_match_hand_built_ones(kind):
  text_mask = jnp.asarray([[True, True, False], [True, True, True]])
  mask = attention_mask(kind, 2, text_mask)
  assert mask.shape == (2, 1, 5, 5) and mask.dtype == bool
  expected = np.asarray(EXPECTED_MASKS[kind], bool)
  np.testing.assert_array_equal(mask[0, 0], expected)
  expected[:, 4] = REAL_LAST_COLUMN[kind]
  np.testing.assert_array_equal(mask[1, 0], expected)


def test_mask_errors():
  with pytest.raises(ValueError, match='unimodal, bidirectional, causal'):
    attention_mask('itc', 2, jnp.ones((1, 3), bool))


@pytest.mark.slow
def test_each_objective_sees_what_its_mask_allows():
  model, params, images, ids = init(config_of('blip2_stage1_shapes'))
  mask = jnp.ones_like(ids, bool)
  other_ids = ids.at[:, 5:].set((ids[:, 5:] + 1) % VOCAB)  # the text changed from position 5

  def forward(m):
    tokens, other_tokens = m.image_tokens(images), m.image_tokens(images[::-1])
    return dict(itc=m.contrastive(tokens, ids, mask),
                itc_other_text=m.contrastive(tokens, other_ids, mask),
                itc_other_image=m.contrastive(other_tokens, ids, mask),
                itg=m.caption_logits(tokens, ids),
                itg_other_text=m.caption_logits(tokens, other_ids),
                itg_other_image=m.caption_logits(other_tokens, ids),
                itm=m.fuse(tokens, ids, mask), itm_other_text=m.fuse(tokens, other_ids, mask))

  def caption_sum(p):
    return jnp.sum(model.apply({'params': p}, images, ids, mask)['caption_logits'])

  out, grads = jax.jit(lambda p: (model.apply({'params': p}, method=forward),
                                  jax.grad(caption_sum)(p)))(params)
  # ITC: the query embeddings never see the text, the text embedding never sees the image.
  (image_emb, text_emb) = out['itc']
  assert image_emb.shape == (3, 4, 32) and text_emb.shape == (3, 32)
  np.testing.assert_allclose(out['itc_other_text'][0], image_emb, atol=1e-6)
  np.testing.assert_allclose(out['itc_other_image'][1], text_emb, atol=1e-6)
  # ITG: position t reads the image and the text up to t, never after.
  np.testing.assert_allclose(out['itg_other_text'][:, :5], out['itg'][:, :5], atol=1e-5)
  assert not np.allclose(out['itg_other_text'][:, 5:], out['itg'][:, 5:])
  assert not np.allclose(out['itg_other_image'][:, 0], out['itg'][:, 0])
  # ITM: the queries read the whole text (bidirectional), and the image.
  assert out['itm'].shape == (3, 4, 32) and not np.allclose(out['itm_other_text'], out['itm'])
  # Gradients never reach the frozen image tower.
  assert not any(np.any(g) for g in jax.tree.leaves(grads['image_encoder']))
  assert np.all(np.any(grads['qformer']['layer_0']['cross_attn']['query_kernel'], axis=0))


def numpy_query_max_contrastive(image_emb, text_emb, scale, smoothing):
  sims = np.einsum('iqe,te->itq', np.asarray(image_emb, np.float64),
                   np.asarray(text_emb, np.float64)).max(-1)
  logits = scale * sims
  n = len(logits)
  def xent(rows):
    log_p = rows - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - rows.max(1, keepdims=True)
    target = np.full((n, n), smoothing / n) + np.eye(n) * (1 - smoothing)
    return -(target * log_p).sum(1).mean()
  return 0.5 * (xent(logits) + xent(logits.T))


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_query_max_contrastive_matches_numpy(smoothing):
  keys = jax.random.split(jax.random.key(0), 2)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  image_emb = unit(jax.random.normal(keys[0], (5, 3, 8)))
  text_emb = unit(jax.random.normal(keys[1], (5, 8)))
  loss, metrics = blip2_losses.query_max_contrastive(image_emb, text_emb, 7.0, smoothing)
  np.testing.assert_allclose(
      loss, numpy_query_max_contrastive(image_emb, text_emb, 7.0, smoothing), rtol=1e-5)
  sims = np.einsum('iqe,te->itq', image_emb, text_emb).max(-1)
  np.testing.assert_allclose(metrics['i2t_accuracy'], np.mean(sims.argmax(1) == np.arange(5)))
  np.testing.assert_allclose(metrics['t2i_accuracy'], np.mean(sims.argmax(0) == np.arange(5)))


def test_hard_negatives_are_drawn_from_the_query_max_similarities():
  keys = jax.random.split(jax.random.key(1), 3)
  image_emb = jax.random.normal(keys[0], (6, 3, 4))
  text_emb = jax.random.normal(keys[1], (6, 4))
  forbidden = jnp.eye(6, dtype=bool).at[0, :].set(True)  # image 0 has no allowed text
  scale = 3.0
  neg_text, text_ok, neg_image, image_ok = blip2_losses.sample_hard_negatives(
      keys[2], image_emb, text_emb, scale, forbidden)
  logits = scale * np.einsum('iqe,te->itq', image_emb, text_emb).max(-1)
  masked = jnp.where(forbidden, -jnp.inf, logits)
  text_rng, image_rng = jax.random.split(keys[2])
  np.testing.assert_array_equal(neg_text[1:], jax.random.categorical(text_rng, masked,
                                                                     axis=1)[1:])
  np.testing.assert_array_equal(neg_image, jax.random.categorical(image_rng, masked, axis=0))
  assert list(text_ok) == [False] + [True] * 5 and all(image_ok)
  with pytest.raises(ValueError, match=r'\[B, Q, E\]'):
    blip2_losses.query_max_similarity(text_emb, text_emb)


@pytest.mark.parametrize('name', ['lm_shapes', 'blip2_shapes'])
def test_cached_decoding_equals_full_recompute(name):
  config = config_of(name)
  config.model.text.depth = 2
  model, params, images, ids = init(config)
  apply = lambda method, *args: model.apply({'params': params}, *args, method=method)
  full = apply(model.logits, images, ids)  # [B, L, V]
  cache = apply(model.init_cache, images, LENGTH)
  prefix = 4 if name == 'blip2_shapes' else 0  # the image's queries come first
  assert cache['self'][0]['key'].shape == (3, prefix + LENGTH, 2, 16)
  step = jax.jit(lambda c, t: apply(model.decode_step, c, t))
  for t in range(LENGTH):
    logits, cache = step(cache, ids[:, t])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
  assert int(cache['index']) == prefix + LENGTH
  if name == 'blip2_shapes':  # the prefix is read: other images, other logits
    assert not np.allclose(apply(model.logits, images[::-1], ids), full)


def test_the_lm_alone_ignores_images_and_reads_a_prefix():
  model, params, images, ids = init(config_of('lm_shapes'))
  apply = lambda method, *args: model.apply({'params': params}, *args, method=method)
  out = model.apply({'params': params}, images, ids, jnp.ones_like(ids, bool))
  assert out['context'].shape == (3, 0, 32) and out['caption_logits'].shape == (3, LENGTH, VOCAB)
  np.testing.assert_allclose(apply(model.logits, images[::-1], ids), out['caption_logits'])
  prefix = jax.random.normal(jax.random.key(3), (3, 2, 32))
  with_prefix = apply(model.caption_logits, prefix, ids)
  assert with_prefix.shape == (3, LENGTH, VOCAB)
  assert not np.allclose(with_prefix, out['caption_logits'])
  with pytest.raises(ValueError, match='exceeds the 10 learned positions'):
    apply(model.caption_logits, None, jnp.zeros((1, 11), jnp.int32))


def test_config_errors_are_one_line():
  with pytest.raises(ValueError, match='model.blip2.adapter .conv.; accepted: linear, mlp'):
    init(config_of('blip2_shapes', blip2={'adapter': 'conv'}))
  config = config_of('blip2_shapes')
  config.model.fusion.width = 0
  with pytest.raises(ValueError, match='fusion.width > 0'):
    models.build_model(config.model, text_max_len=LENGTH)
  config = config_of('blip2_shapes')
  model = models.build_model(config.model, text_max_len=LENGTH)
  config.loss.weights.itc = 1.0
  with pytest.raises(ValueError, match='itc > 0 needs contrastive embeddings'):
    objectives.make_loss_fn(model, config)
  config.loss.weights.itc, config.optim.frozen = 0.0, ('lm/',)
  with pytest.raises(ValueError, match="add 'image_encoder/' to optim.frozen"):
    objectives.make_loss_fn(model, config)
  config = config_of('blip2_stage1_shapes')
  config.loss.weights.vqa = 1.0
  with pytest.raises(ValueError, match=r"\['vqa'\] are not objectives of BLIP-2 stage 1"):
    objectives.make_loss_fn(models.build_model(config.model, text_max_len=LENGTH), config)
  config = config_of('blip2_shapes')
  config.eval.zeroshot = True
  with pytest.raises(ValueError, match='no contrastive embeddings for eval zeroshot'):
    runner.evaluate(config, model, {}, None)
  config = config_of('blip2_shapes')
  config.init.lm = '/nowhere'
  with pytest.raises(pretrained.PretrainedError, match='init.lm is loaded with init.pretrained'):
    pretrained.apply_config(config)


# The chain on the tiny data: CLIP -> stage 1, LM -> stage 2, a few steps each.


def _flat(params):
  return R.flatten(jax.device_get(params))


@pytest.fixture(scope='module')
def chain(shapes_small_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp('blip2')
  runs = {}

  def run(name, config_name, **init):
    config = tiny_config(shapes_small_dir, config_name, num_steps=3, log_every_steps=1)
    config.checkpoint.every_steps = 3
    config.eval.splits, config.eval.max_examples = ('test',), 24
    config.init.update(init)
    state, results = trainer.train_and_evaluate(config, str(root / name))
    runs[name] = (str(root / name), _flat(state.params), results, config)
    return runs[name][0]

  clip = run('clip', 'clip_shapes')
  stage1 = run('stage1', 'blip2_stage1_shapes', pretrained=clip)
  lm = run('lm', 'lm_shapes')
  run('stage2', 'blip2_shapes', pretrained=stage1, lm=lm)
  return runs


@pytest.mark.slow
def test_stage1_trains_its_three_objectives_on_a_frozen_clip_tower(chain):
  _, clip, _, _ = chain['clip']
  workdir, params, _, _ = chain['stage1']
  image = [p for p in params if p.startswith('image_encoder/')]
  assert image and all(np.array_equal(params[p], clip[p]) for p in image)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  rows = [r for r in rows if 'train/loss' in r]
  for key in ('itc', 'itm', 'caption', 'i2t_accuracy', 'itm_accuracy', 'caption_accuracy'):
    assert np.isfinite(rows[-1][f'train/{key}']), key
  np.testing.assert_allclose(rows[0]['train/logit_scale'], 1 / 0.07, rtol=1e-2)


@pytest.mark.slow
def test_stage2_trains_the_adapter_and_qformer_only(chain):
  _, clip, _, _ = chain['clip']
  _, stage1, _, _ = chain['stage1']
  _, lm, lm_results, _ = chain['lm']
  workdir, params, results, config = chain['stage2']
  # Frozen: the image tower (CLIP's, through stage 1) and the LM, bit for bit.
  for path, value in params.items():
    if path.startswith('image_encoder/'):
      assert np.array_equal(value, clip[path]), path
    if path.startswith('lm/'):
      assert np.array_equal(value, lm[path[len('lm/'):]]), path
  assert {p[len('lm/'):] for p in params if p.startswith('lm/')} == set(lm)
  # Trained: the adapter (from its initialisation) and the query side of the Q-Former.
  fresh = trainer.Setup(config).init_state(jax.random.split(jax.random.key(config.seed))[0])
  fresh = _flat(fresh.params)
  adapter = [p for p in params if p.startswith('adapter/')]
  assert adapter and all(not np.array_equal(params[p], fresh[p]) for p in adapter)
  qformer = [p for p in params if p.startswith('qformer/')]
  assert set(qformer) == {p for p in stage1 if p.startswith('qformer/') and 'text' not in p}
  assert not np.array_equal(params['qformer/query_tokens'], stage1['qformer/query_tokens'])
  # Parameter counts, by hand.
  size = lambda paths: sum(params[p].size for p in paths)
  trainable, total = size(adapter + qformer), size(list(params))
  counts = json.load(open(os.path.join(workdir, 'params.json')))
  assert counts == {'total': total, 'trainable': trainable, 'frozen': total - trainable}
  adapter_only = config.copy_and_resolve_references()
  adapter_only.optim.frozen = (*config.optim.frozen, 'qformer/')
  assert trainer.Setup(adapter_only).num_trainable == size(adapter)
  for metric in ('cider', 'bleu4', 'caption_object_accuracy', 'vqa_accuracy'):
    assert np.isfinite(results[f'eval/test/{metric}']), metric
    assert np.isfinite(lm_results[f'eval/test/{metric}']), metric  # the blind LM


@pytest.mark.slow
def test_stage2_with_lora_on_the_lm_counts_factors_adapter_and_qformer(chain):
  _, params, _, config = chain['stage2']
  config = config.copy_and_resolve_references()
  config.model.lora.update(rank=2, targets=('lm/.*attn/(qkv|out)_kernel',))
  setup = trainer.Setup(config)
  # Per LM layer (width 32, 2 heads of 16), rank 2: qkv A [32, 3, 2] and B [3, 2, 2, 16],
  # out A [2, 16, 2] and B [2, 32].
  factors = 32 * 3 * 2 + 3 * 2 * 2 * 16 + 2 * 16 * 2 + 2 * 32
  base = sum(v.size for p, v in params.items() if p.startswith(('adapter/', 'qformer/')))
  assert setup.num_trainable == base + factors * config.model.text.depth


@pytest.mark.slow
def test_generate_captions_and_answers_with_stage2(chain, shapes_small_dir, tmp_path):
  workdir, _, _, config = chain['stage2']
  image = tmp_path / 'scene.png'
  source = datasets.data_source(config.data, 'test')
  Image.fromarray(source[0]['image']).save(image)
  result = subprocess.run(
      [sys.executable, '-m', 'vlm_jax.generate', f'--workdir={workdir}', f'--image={image}',
       '--question=what color is the circle?', '--beams=2'],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('\n') == 1


@pytest.mark.slow
def test_init_lm_must_be_a_causal_lm_for_stage2(chain):
  stage1, lm = chain['stage1'][0], chain['lm'][0]
  config = config_of('blip2_shapes')
  config.init.update(pretrained=stage1, lm=stage1)
  with pytest.raises(pretrained.PretrainedError,
                     match="holds a 'blip2_qformer' model; expected a 'causal_lm' workdir"):
    pretrained.apply_config(config)
  config = config_of('blip2_stage1_shapes')
  config.init.update(pretrained=chain['clip'][0], lm=lm)
  with pytest.raises(pretrained.PretrainedError, match="language model of model.name='blip2'"):
    pretrained.apply_config(config)
