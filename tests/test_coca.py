"""CoCa: cached decoding against the full sequence, the captioning loss, VQA sequences, the
objective, training and evaluation end to end, and the generate command line."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax import cli
from vlm_jax import config_utils
from vlm_jax import defaults
from vlm_jax import models
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.data import vqa
from vlm_jax.eval import captioning as captioning_eval
from vlm_jax.inference import decoding
from vlm_jax.inference import generation
from vlm_jax.losses import captioning
from vlm_jax.nn.attention import MultiHeadAttention, causal_mask
from vlm_jax.training import objectives
from vlm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, LENGTH = 40, 10


def coca_config(**decoder):
  c = cli._load_config_file(os.path.join(REPO, 'configs', 'coca_shapes.py:tiny'))
  c.model.text.vocab_size = VOCAB
  c.model.decoder.update(decoder)
  return c


def init(config, batch=3, seed=0):
  model = models.build_model(config.model, text_max_len=LENGTH)
  keys = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(keys[0], (batch, 32, 32, 3))
  ids = jax.random.randint(keys[1], (batch, LENGTH), 0, VOCAB)
  params = model.init(keys[2], images, ids, jnp.ones_like(ids, bool))['params']
  # Perturb every parameter so that no zero-initialised bias or unit scale hides a bug.
  leaves, tree = jax.tree.flatten(params)
  noise = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in
                           zip(leaves, noise)])
  return model, params, images, ids


def test_attention_decoding_methods_match_call():
  attn = MultiHeadAttention(num_heads=2)
  keys = jax.random.split(jax.random.key(0), 3)
  x, context = jax.random.normal(keys[0], (2, 6, 8)), jax.random.normal(keys[1], (2, 5, 12))
  self_params = attn.init(keys[2], x)
  cross_params = attn.init(keys[2], x, context)
  full = attn.apply(self_params, x, mask=causal_mask(6))
  cache = jnp.zeros((2, 8, 2, 4))
  # Two positions, then four at once: chunks see the cache and, causally, each other.
  y0, k, v = attn.apply(self_params, x[:, :2], cache, cache, jnp.int32(0),
                        method=attn.attend_cached)
  y1, k, v = attn.apply(self_params, x[:, 2:], k, v, jnp.int32(2), method=attn.attend_cached)
  np.testing.assert_allclose(jnp.concatenate([y0, y1], axis=1), full, atol=1e-5)
  assert not jnp.any(k[:, 6:]) and jnp.all(k[:, :6] != 0)
  key, value = attn.apply(cross_params, context, method=attn.project_kv)
  np.testing.assert_allclose(attn.apply(cross_params, x, key, value, method=attn.attend_kv),
                             attn.apply(cross_params, x, context), atol=1e-5)


@pytest.mark.parametrize('tie', [False, True])
def test_cached_steps_give_the_full_sequence_logits(tie):
  model, params, images, ids = init(coca_config(unimodal_depth=2, multimodal_depth=2,
                                                tie_embeddings=tie))
  apply = lambda method, *args: model.apply({'params': params}, *args, method=method)
  full = apply(model.logits, images, ids)  # [B, L, V]
  cache = apply(model.init_cache, images, LENGTH)
  reference = apply(model.init_reference_cache, images, LENGTH)
  step = jax.jit(lambda c, t: apply(model.decode_step, c, t))
  reference_step = jax.jit(lambda c, t: apply(model.reference_step, c, t))
  for t in range(LENGTH):
    logits, cache = step(cache, ids[:, t])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
    logits, reference = reference_step(reference, ids[:, t])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)
  assert int(cache['index']) == LENGTH


def test_training_outputs_and_padding():
  model, params, images, ids = init(coca_config())
  mask = jnp.arange(LENGTH)[None] < jnp.asarray([[LENGTH], [4], [7]])
  padded = jnp.where(mask, ids, 0)
  out = model.apply({'params': params}, images, padded, mask)
  assert out['image_emb'].shape == out['text_emb'].shape == (3, 32)
  np.testing.assert_allclose(jnp.linalg.norm(out['text_emb'], axis=-1), 1.0, atol=1e-5)
  assert out['context'].shape == (3, 4, 32) and out['caption_logits'].shape == (3, LENGTH, VOCAB)
  assert out['logit_scale'].shape == out['logit_bias'].shape == ()
  # The appended [CLS] changes no text position; padding changes no real position.
  full = model.apply({'params': params}, images, ids, method=model.logits)
  for row, n in enumerate((LENGTH, 4, 7)):
    np.testing.assert_allclose(out['caption_logits'][row, :n], full[row, :n], atol=1e-5)
  # The contrastive text embedding ignores padding.
  repadded = jnp.where(mask, ids, 5)
  np.testing.assert_allclose(
      model.apply({'params': params}, repadded, mask, method=model.encode_text),
      out['text_emb'], atol=1e-5)


def test_decode_errors():
  model, params, images, _ = init(coca_config())
  with pytest.raises(ValueError, match='max_len=11 must be in'):
    model.apply({'params': params}, images, LENGTH + 1, method=model.init_cache)
  with pytest.raises(ValueError, match='exceeds the 10 learned positions'):
    model.apply({'params': params}, images, jnp.zeros((3, 11), jnp.int32),
                method=model.logits)


def test_greedy_decoding_is_the_same_with_and_without_the_cache():
  model, params, images, ids = init(coca_config())
  apply = lambda method, *args: model.apply({'params': params}, *args, method=method)
  prompt, prompt_len = ids[:, :3], jnp.asarray([1, 3, 2], jnp.int32)
  kwargs = dict(max_len=LENGTH, eos_id=3, pad_id=0)
  cached = decoding.greedy(lambda c, t: apply(model.decode_step, c, t),
                           apply(model.init_cache, images, LENGTH), prompt, prompt_len,
                           **kwargs)
  uncached = decoding.greedy(lambda c, t: apply(model.reference_step, c, t),
                             apply(model.init_reference_cache, images, LENGTH), prompt,
                             prompt_len, **kwargs)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  beams = decoding.beam_search(lambda c, t: apply(model.decode_step, c, t),
                               apply(model.init_cache, images, LENGTH), prompt, prompt_len,
                               beam_size=3, **kwargs)
  assert beams.beam_tokens.shape == (3, 3, LENGTH)


def numpy_caption_loss(logits, targets, weights, smoothing):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  vocab = logits.shape[-1]
  q = np.full(logits.shape, smoothing / vocab)
  np.put_along_axis(q, np.asarray(targets)[..., None], 1 - smoothing + smoothing / vocab, -1)
  per_token = -(q * log_probs).sum(-1)
  weights = np.asarray(weights, np.float64)
  return (per_token * weights).sum() / weights.sum()


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_caption_loss_matches_numpy(smoothing):
  keys = jax.random.split(jax.random.key(0), 3)
  logits = 3 * jax.random.normal(keys[0], (4, 6, 11))
  targets = jax.random.randint(keys[1], (4, 6), 0, 11)
  weights = jax.random.bernoulli(keys[2], 0.6, (4, 6))
  loss, metrics = captioning.caption_loss(logits, targets, weights, smoothing)
  np.testing.assert_allclose(loss, numpy_caption_loss(logits, targets, weights, smoothing),
                             rtol=1e-5)
  correct = (np.argmax(logits, -1) == np.asarray(targets)) & np.asarray(weights)
  np.testing.assert_allclose(metrics['accuracy'], correct.sum() / np.sum(weights), rtol=1e-6)
  loss, metrics = captioning.caption_loss(logits, targets, jnp.zeros_like(weights), smoothing)
  assert float(loss) == 0.0 and float(metrics['accuracy']) == 0.0


def test_caption_loss_errors():
  with pytest.raises(ValueError, match='label_smoothing'):
    captioning.caption_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, 2)), 1.0)
  with pytest.raises(ValueError, match='do not agree'):
    captioning.caption_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32),
                            jnp.ones((1, 3)))


def test_next_token_targets():
  ids = jnp.asarray([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
  targets, weights = captioning.next_token_targets(ids, ids > 0)
  np.testing.assert_array_equal(targets, [[7, 8, 3, 0, 0], [9, 3, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_vqa_sequences_put_the_loss_on_the_answer_only(shapes_small_cfg):
  tokenizer = datasets.load_tokenizer(shapes_small_cfg)
  questions = ['what color is the circle?', 'how many objects are there?']
  ids, mask, loss_mask = vqa.vqa_sequences(tokenizer, questions, ['red', 'two'], 16)
  for row, answer in enumerate(['red', 'two']):
    assert tokenizer.decode(ids[row][loss_mask[row]]) == answer  # answer + EOS
    assert ids[row][loss_mask[row]][-1] == tokenizer.eos_id and loss_mask[row].sum() == 2
    assert tokenizer.decode(ids[row][mask[row] & ~loss_mask[row]]) == questions[row].replace(
        '?', ' ?')
  prompt, prompt_len = vqa.question_prompts(tokenizer, questions, 15)
  assert prompt.shape == (2, 15) and list(prompt_len) == [7, 7]
  assert (prompt[np.arange(2), prompt_len] == tokenizer.eos_id).all()


def test_the_train_stream_has_vqa_fields_only_with_data_vqa(small_data_cfg):
  tokenizer = datasets.load_tokenizer(small_data_cfg)
  plain = pipeline.make_train_dataset(small_data_cfg, tokenizer, 8, seed=0)[0]
  assert set(plain) == {'image', 'text_ids', 'text_mask'}
  small_data_cfg.vqa = True
  batch = pipeline.make_train_dataset(small_data_cfg, tokenizer, 8, seed=0)[0]
  assert set(batch) == set(plain) | {'vqa_ids', 'vqa_mask', 'vqa_loss_mask'}
  np.testing.assert_array_equal(batch['text_ids'], plain['text_ids'])
  assert (batch['vqa_loss_mask'] <= batch['vqa_mask']).all()
  assert (batch['vqa_loss_mask'].sum(1) >= 2).all()  # a one-word answer and EOS


def test_objective_checks():
  config = coca_config()
  model = models.build_model(config.model, text_max_len=LENGTH)
  config.data.vqa = False
  with pytest.raises(ValueError, match='needs data.vqa=True'):
    objectives.make_loss_fn(model, config)
  config.data.vqa, config.loss.weights.itm = True, 1.0
  with pytest.raises(ValueError, match=r"\['itm'\] are not objectives of captioners"):
    objectives.make_loss_fn(model, config)
  config.loss.weights.itm, config.train.microbatches = 0.0, 2
  with pytest.raises(ValueError, match='microbatches=1'):
    objectives.make_loss_fn(model, config)
  fusion = cli._load_config_file(os.path.join(REPO, 'configs', 'albef_shapes.py:tiny'))
  fusion.model.text.vocab_size, fusion.loss.weights.vqa = VOCAB, 1.0
  fusion_model = models.build_model(fusion.model, text_max_len=LENGTH)
  with pytest.raises(ValueError, match=r"\['vqa'\] are not objectives of fusion"):
    objectives.make_loss_fn(fusion_model, fusion)
  fusion.loss.weights.vqa, fusion.loss.weights.caption = 0.0, 1.0
  with pytest.raises(ValueError, match='needs a causal text tower and fusion layer'):
    objectives.make_loss_fn(fusion_model, fusion)


def test_caption_object_accuracy():
  objects = [[{'color': 'red', 'shape': 'circle'}], [{'color': 'blue', 'shape': 'cross'}],
             [{'color': 'red', 'shape': 'circle'}, {'color': 'blue', 'shape': 'square'}],
             [{'color': 'white', 'shape': 'diamond'}]]
  captions = ['a small red circle', 'a blue cross and a red square', 'anything',
              'a white diamond in the top left']
  assert captioning_eval.caption_object_accuracy(captions, objects) == pytest.approx(2 / 3)
  assert not captioning_eval.names_object('a red square', 'red', 'circle')


def test_decode_options_are_checked():
  with pytest.raises(ValueError, match='not both'):
    generation.DecodeOptions(beams=2, temperature=1.0).check()
  with pytest.raises(ValueError, match='set temperature > 0'):
    generation.DecodeOptions(top_k=5).check()


def tiny_run_config(data_dir):
  config = cli._load_config_file(os.path.join(REPO, 'configs', 'coca_shapes.py:tiny'))
  config.data.data_dir = str(data_dir)
  config.train.num_steps, config.train.log_every_steps, config.checkpoint.every_steps = 3, 1, 3
  config.eval.splits, config.eval.max_examples = ('test',), 24
  return config


@pytest.mark.slow
def test_tiny_coca_trains_evaluates_and_generates(shapes_small_dir, tmp_path):
  workdir = tmp_path / 'coca'
  _, results = trainer.train_and_evaluate(tiny_run_config(shapes_small_dir), str(workdir))
  for metric in ('cider', 'bleu4', 'caption_object_accuracy', 'vqa_accuracy',
                 'vqa_accuracy_single_object', 'zeroshot_top1', 'i2t_recall@1'):
    assert np.isfinite(results[f'eval/test/{metric}']), metric
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert {'train/itc', 'train/caption', 'train/vqa', 'train/caption_accuracy'} <= set(rows[0])

  image = tmp_path / 'scene.png'
  source = datasets.data_source(tiny_run_config(shapes_small_dir).data, 'test')
  Image.fromarray(source[0]['image']).resize((48, 48)).save(image)  # resized back to 32
  env = dict(os.environ, XLA_FLAGS='')
  run = functools.partial(subprocess.run, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  generate = [sys.executable, '-m', 'vlm_jax.generate']
  for extra in (['--beams=2'],
                ['--question=what color is the circle?', '--temperature=0.7', '--top_k=5']):
    result = run([*generate, f'--workdir={workdir}', f'--image={image}', *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('\n') == 1  # one line of text (empty after 3 steps or not)

  bad_image = tmp_path / 'bad.png'
  bad_image.write_text('not an image')
  clip_dir = tmp_path / 'clip'
  clip_dir.mkdir()
  (clip_dir / 'config.json').write_text(config_utils.to_json(defaults.base_config()))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((workdir / 'config.json').read_text())
  for args, message in (([f'--workdir={tmp_path}/missing', f'--image={image}'], 'No workdir'),
                        ([f'--workdir={workdir}', f'--image={bad_image}'], 'Cannot read image'),
                        ([f'--workdir={workdir}', f'--image={tmp_path}/none.png'],
                         'No image file'),
                        ([f'--workdir={clip_dir}', f'--image={image}'], 'does not generate'),
                        ([f'--workdir={workdir}', f'--image={image}', '--beams=2',
                          '--temperature=1'], 'not both'),
                        ([f'--workdir={empty}', f'--image={image}'], 'No checkpoint')):
    result = run([*generate, *args])
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert message in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.slow
def test_decoding_benchmark_runs(tmp_path):
  out = tmp_path / 'decoding.json'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.decoding',
       '--config=configs/coca_shapes.py:tiny', '--new_tokens=4', '--runs=1', '--batch=2',
       f'--out={out}', f'--config.data.data_dir={tmp_path}/none'],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['same_tokens'] and results['speedup'] > 0
  assert results['cached_tokens_per_sec'] > 0 and 'speedup' in result.stdout
