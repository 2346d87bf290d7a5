"""Fusion models end to end: every fusion config trains and evaluates through the normal
trainer, a fusion layer defined here trains with no change to the package, and the train
stream's hard negatives are false captions of their images."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vlm_jax import fusion
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.data import records
from vlm_jax.data import shapes_text
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order

FUSION_CONFIGS = ('albef_shapes', 'vilt_shapes', 'flamingo_shapes', 'qformer_shapes')


def tiny_fusion_config(name, data_dir):
  config = tiny_config(data_dir, name, num_steps=3, log_every_steps=1)
  config.checkpoint.every_steps = 3
  config.eval.splits, config.eval.max_examples, config.eval.rerank_k = ('test',), 32, 4
  return config


@pytest.mark.slow
@pytest.mark.parametrize('name', FUSION_CONFIGS)
def test_fusion_config_trains_and_reports_matching_metrics(name, shapes_small_dir, tmp_path):
  config = tiny_fusion_config(name, shapes_small_dir)
  _, results = trainer.train_and_evaluate(config, str(tmp_path))
  for metric in ('relation_accuracy', 'attribute_accuracy', 'itc_relation_accuracy',
                 'itm_accuracy', 'i2t_rerank_recall@1', 't2i_rerank_recall@10',
                 'zeroshot_top1', 'i2t_recall@1'):
    assert 0.0 <= results[f'eval/test/{metric}'] <= 1.0, metric
  rows = [line for line in open(tmp_path / 'metrics.jsonl') if '"train/itm"' in line]
  assert len(rows) == 3
  assert ('"train/mlm"' in rows[0]) == (config.loss.weights.mlm > 0)
  assert ('"train/caption"' in rows[0]) == (config.loss.weights.caption > 0)
  for metric in ('position_accuracy', 'position_accuracy_one_object',
                 'position_accuracy_two_objects'):
    assert 0.0 <= results[f'eval/test/{metric}'] <= 1.0, metric


class AddImageMean(nn.Module):
  """A user's fusion layer: each text token plus a projection of the mean image token."""
  width: int

  @nn.compact
  def __call__(self, image_tokens, image_mask, text_tokens, text_mask, deterministic=True):
    del image_mask, text_mask, deterministic
    image = nn.Dense(self.width, name='image_proj')(jnp.mean(image_tokens, axis=1))
    return nn.LayerNorm(name='ln')(nn.Dense(self.width)(text_tokens) + image[:, None])


@pytest.mark.slow
def test_a_fusion_layer_registered_in_a_test_trains_through_the_trainer(
    shapes_small_dir, tmp_path):
  fusion.register_fusion('add_image_mean',
                         lambda model_cfg: AddImageMean(fusion.fusion_width(model_cfg)))
  try:
    config = tiny_fusion_config('albef_shapes', shapes_small_dir)
    config.model.fusion.name = 'add_image_mean'
    state, results = trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    del fusion.FUSION_LAYERS['add_image_mean']
  assert int(state.step) == 3
  assert 'image_proj' in state.params['fusion']
  assert 0.0 <= results['eval/test/relation_accuracy'] <= 1.0


def test_hard_negatives_in_the_train_stream_are_false_captions(small_data_cfg):
  small_data_cfg.hard_negatives = True
  tokenizer = datasets.load_tokenizer(small_data_cfg)
  batch = pipeline.make_train_dataset(small_data_cfg, tokenizer, 64, seed=0)[0]
  assert batch['neg_text_ids'].shape == batch['text_ids'].shape
  assert batch['neg_valid'].dtype == bool and 0 < batch['neg_valid'].sum() < 64
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  kinds = set()
  for index in range(40):
    features = records.parse(source[index])
    captions = records.texts(features, 'captions')
    two_objects = bool(records.texts(features, 'hard_negative')[0])
    for caption in captions:
      for bit in (0, 1):
        negative = pipeline._hard_negative(features, caption, bit << 62)
        if not two_objects:
          assert negative == ''
        if not negative:
          continue
        # A false caption of the image, with exactly the words of the true one.
        assert negative not in captions
        assert sorted(negative.split()) == sorted(caption.split())
        colors = records.texts(features, 'objects/color')
        kinds.add('colors' if negative == caption.replace(colors[0], '#').replace(
            colors[1], colors[0]).replace('#', colors[1]) else 'objects')
  assert kinds == {'colors', 'objects'}


def test_position_negatives_mirror_every_position_word(small_data_cfg):
  mirror = lambda caption: shapes_text.mirror_positions(caption, [], [])
  assert mirror('a red circle on the left') == 'a red circle on the right'
  assert mirror('a small red circle in the top left') == 'a small red circle in the bottom right'
  assert mirror('a red circle above a blue star') == 'a red circle below a blue star'
  assert mirror('a red circle in the middle') == '' and mirror('a red circle and a star') == ''
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  one_object = 0
  for index in range(40):
    features = records.parse(source[index])
    for caption in records.texts(features, 'captions'):
      picked = pipeline._hard_negative(features, caption, 0, ('position',))
      assert picked == mirror(caption)
      one_object += bool(picked) and len(records.texts(features, 'objects/color')) == 1
  assert one_object > 0  # unlike the swaps, one-object captions get one too
  # With all three kinds, the hash picks each of them where all three exist.
  checked = 0
  for index in range(40):
    features = records.parse(source[index])
    for caption in records.texts(features, 'captions'):
      each = {pipeline._hard_negative(features, caption, 0, (kind,))
              for kind in pipeline.HARD_NEGATIVE_KINDS}
      if '' in each or len(each) < 3:
        continue
      picks = {pipeline._hard_negative(features, caption, h << 32,
                                       pipeline.HARD_NEGATIVE_KINDS) for h in range(3)}
      assert picks == each
      checked += 1
  assert checked > 0


def test_hard_negative_kinds_pick_the_swap(small_data_cfg):
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  found = 0
  for index in range(40):
    features = records.parse(source[index])
    colors = records.texts(features, 'objects/color')
    for caption in records.texts(features, 'captions'):
      relation = pipeline._hard_negative(features, caption, 0, ('relation',))
      attribute = pipeline._hard_negative(features, caption, 0, ('attribute',))
      if relation:  # the objects exchanged: the colour named first is now the other one
        found += 1
        first = lambda text: min((text.index(c), c) for c in colors)[1]
        assert relation != attribute and first(relation) != first(caption)
        assert sorted(relation.split()) == sorted(caption.split())
      if attribute:
        swapped = caption.replace(colors[0], '#').replace(colors[1], colors[0])
        assert attribute == swapped.replace('#', colors[1])
  assert found > 0
  with pytest.raises(ValueError, match="hard_negative_kinds.*'relation', 'attribute'"):
    pipeline.check_hard_negative_kinds(('relations',))


def test_itm_without_batch_negatives_scores_true_against_false_captions(shapes_small_dir,
                                                                        tmp_path):
  config = tiny_fusion_config('albef_shapes', shapes_small_dir)
  config.loss.itm_batch_negatives = False
  config.data.hard_negative_kinds = ('relation',)
  config.eval.splits = ()
  state, _ = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 3
  config.data.hard_negatives = False
  with pytest.raises(ValueError, match='itm_batch_negatives=False.*data.hard_negatives=True'):
    trainer.train_and_evaluate(config, str(tmp_path / 'no_negatives'))


def test_the_fused_caption_objective_needs_causal_text_and_fusion(shapes_small_dir, tmp_path):
  config = tiny_fusion_config('albef_shapes', shapes_small_dir)
  config.loss.weights.caption = 1.0
  with pytest.raises(ValueError, match='needs a causal text tower and fusion layer'):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_fusion_name_is_a_clear_error():
  config = tiny_config('', 'albef_shapes')
  config.model.fusion.name = 'crossattention'
  config.model.text.vocab_size = 100
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='model.fusion.name.*cross_attention'):
    models.build_model(config.model, text_max_len=16)


def test_the_readme_fusion_example_builds_and_runs():
  readme = open(os.path.join(REPO, 'README.md')).read()
  section = readme[readme.index('### Add a fusion layer'):]
  code = section[section.index('```python') + len('```python'):section.index('```\n\n')]
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  try:
    config = tiny_config('', 'albef_shapes')
    config.model.fusion.name = 'film'
    config.model.text.vocab_size = 50
    from vlm_jax import models  # pylint: disable=g-import-not-at-top
    model = models.build_model(config.model, text_max_len=8)
    images = jnp.zeros((2, 32, 32, 3))
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    variables = model.init(jax.random.key(0), images, ids, mask)
    outputs = model.apply(variables, images, ids, mask)
  finally:
    fusion.FUSION_LAYERS.pop('film', None)
  assert outputs['fused'].shape == (2, 8, 32)
  assert outputs['itm_logits'].shape == (2, 2) and outputs['mlm_logits'].shape == (2, 8, 50)
  assert 'film' in variables['params']['fusion']
