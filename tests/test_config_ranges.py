"""Every numeric and enumerated config key is checked at load: one accepted and one rejected
value per key (`defaults.RANGES`, the registries of `config_utils._choices`), the rules
between keys, and the command line's one `error:` line with exit status 2."""
import os
import re
import subprocess
import sys

import pytest

from vlm_jax import cli
from vlm_jax import config_utils
from vlm_jax import defaults

from run_configs import REPO  # pylint: disable=g-bad-import-order

TINY = 'configs/clip_shapes.py:tiny'

# Keys every transformer tower has: (name, an accepted value, a rejected value).
_TOWER_KEYS = [('depth', 1, 0), ('num_heads', 1, 0), ('mlp_dim', 1, 0)]

# (key, an accepted value, a rejected value); sentinels (-1, 0 with a meaning) are accepted.
VALUES = [
    *[(f'model.{tower}.{key}', ok, bad) for tower in ('image', 'text', 'fusion')
      for key, ok, bad in _TOWER_KEYS],
    ('model.image.width', 64, 0),
    ('model.text.width', 64, 0),
    ('model.fusion.width', 0, -1),  # 0: the text width
    ('seed', 7, -1),
    ('data.image_size', 1, 0),
    ('data.max_text_len', 2, 1),
    ('data.mean', (0.0, 0.5, 1.0), (0.5, 1.5, 0.5)),
    ('data.std', (0.2, 0.3, 0.4), (0.5, 0.0, 0.5)),
    ('data.drop_color_prob', 1.0, 1.1),
    ('data.curriculum.steps', 0, -1),
    ('data.curriculum.max_objects', 2, 0),
    ('data.curriculum.first_caption_steps', 0, -1),
    ('data.num_threads', 1, 0),
    ('data.prefetch', 0, -1),
    ('data.val_fraction', 0.0, 1.0),
    ('data.test_fraction', 0.5, -0.1),
    ('data.split_seed', 3, -2),
    ('model.embed_dim', 16, 0),
    ('model.image.patch_size', 4, 0),
    ('model.image.ln_eps', 1e-6, 0.0),
    ('model.image.dropout', 0.5, 1.0),
    ('model.image.posemb_grid', 0, -1),
    ('model.image.patch_dropout', 0.5, 1.0),
    ('model.image.layers', (1, 2), (1, 0)),
    ('model.image.norm_groups', 1, 0),
    ('model.text.vocab_size', 0, -1),
    ('model.text.ln_eps', 1e-12, -1e-5),
    ('model.text.dropout', 0.0, -0.1),
    ('model.text.max_len', 0, -1),
    ('model.text.type_vocab_size', 0, -1),
    ('model.fusion.dropout', 0.1, 1.5),
    ('model.fusion.ln_eps', 1e-6, 0.0),
    ('model.fusion.every', 2, 0),
    ('model.fusion.num_queries', 1, 0),
    ('model.decoder.unimodal_depth', 0, -1),
    ('model.decoder.multimodal_depth', 1, 0),
    ('model.decoder.num_queries', 1, 0),
    ('model.temperature.init', 0.0, float('nan')),
    ('model.temperature.min', float('-inf'), float('nan')),
    ('model.temperature.max', float('inf'), float('nan')),
    ('model.temperature.bias_init', -10.0, float('inf')),
    ('model.lora.rank', 0, -1),
    ('model.lora.alpha', 16.0, 0.0),
    ('loss.weights.itc', 0.0, -1.0),
    ('loss.weights.itm', 2.0, -0.5),
    ('loss.weights.mlm', 0.0, -1.0),
    ('loss.weights.caption', 1.0, -1.0),
    ('loss.weights.vqa', 1.0, float('nan')),
    ('loss.label_smoothing', 0.1, 1.0),
    ('loss.block_size', 1, 0),
    ('loss.itm_negative_scale', -1.0, -2.0),
    ('loss.mlm_probability', 1.0, 1.5),
    ('loss.mlm_word_classes.spatial.probability', 0.5, -0.1),
    ('loss.mlm_word_classes.attribute.probability', 0.0, 2.0),
    ('loss.mlm_word_classes.object.probability', 1.0, 1.01),
    ('loss.mlm_word_classes.spatial.token_ids', (0, 5), (5, -1)),
    ('loss.mlm_word_classes.attribute.token_ids', (), (-3,)),
    ('loss.mlm_word_classes.object.token_ids', (1,), (-1,)),
    ('loss.mlm_mask_id', -1, -2),
    ('optim.learning_rate', 1e-4, -1.0),
    ('optim.warmup_steps', 0, -1),
    ('optim.end_learning_rate_factor', 1.0, 1.5),
    ('optim.b1', 0.0, 1.0),
    ('optim.b2', 0.999, 1.0),
    ('optim.eps', 1e-8, 0.0),
    ('optim.weight_decay', 0.0, -0.1),
    ('optim.grad_clip_norm', 0.0, -1.0),
    ('parallel.mesh.data', -1, 0),
    ('parallel.mesh.fsdp', 1, -2),
    ('parallel.mesh.tensor', 1, 0),
    ('train.num_steps', 2, -1),
    ('train.batch_size', 1, 0),
    ('train.log_every_steps', 1, 0),
    ('train.max_steps_per_run', 0, -1),
    ('train.microbatches', 1, 0),
    ('train.max_consecutive_skips', 0, -1),
    ('eval.every_steps', 0, -1),
    ('eval.batch_size', 1, 0),
    ('eval.max_examples', 0, -1),
    ('eval.rerank_k', 1, 0),
    ('checkpoint.every_steps', 0, -1),
    ('checkpoint.keep', 1, 0),
    # Enumerated keys (the registries that read them).
    ('data.name', 'image_text_folder', 'coco'),
    ('data.builder_config', '64px', '48px'),
    ('data.resize', 'squash', 'stretch'),
    ('data.encoding', 'jpeg', 'gif'),
    ('data.hard_negative_kinds', ('position',), ('relation', 'colour')),
    ('model.name', 'fusion_encoder', 'clip'),
    ('model.dtype', 'bfloat16', 'bf16'),
    ('model.param_dtype', 'float32', 'fp32'),
    ('model.remat', 'full', 'True'),
    ('model.image.name', 'resnet', 'vgg'),
    ('model.image.norm', 'group', 'batch'),
    ('model.image.pool', 'map', 'mean'),
    ('model.image.posemb', 'sincos2d', 'rope'),
    ('model.text.name', 'transformer', 'lstm'),
    ('model.text.pool', 'last', 'first'),
    ('model.fusion.name', 'qformer', 'crossattention'),
    ('model.fusion.pool', 'mean', 'max'),
    ('model.blip2.adapter', 'mlp', 'conv'),
    ('loss.name', 'sigmoid', 'softmx'),
    ('loss.positives', 'same_text', 'same'),
    ('optim.name', 'adamw', 'adam_w'),
    ('optim.schedule', 'linear', 'cos'),
    ('parallel.mode', 'pmap', 'pjit'),
    ('train.nonfinite', 'stop', 'ignore'),
]


def _config():
  return cli._load_config_file(os.path.join(REPO, TINY))  # pylint: disable=protected-access


def _set(config, key: str, value) -> None:
  *groups, leaf = key.split('.')
  for group in groups:
    config = config[group]
  setattr(config, leaf, value)


def test_the_table_covers_every_checked_key():
  choices = config_utils._choices(_config())  # pylint: disable=protected-access
  checked = set(defaults.RANGES) | set(choices)
  assert checked == {key for key, _, _ in VALUES}


@pytest.mark.parametrize('key,accepted,rejected', VALUES, ids=[row[0] for row in VALUES])
def test_each_key_accepts_its_range_and_names_it_when_refusing(key, accepted, rejected):
  config = _config()
  _set(config, key, accepted)
  config_utils.check_values(config)
  _set(config, key, rejected)
  with pytest.raises(ValueError) as error:
    config_utils.check_values(config)
  message = str(error.value)
  assert f'{key}={rejected!r}' in message
  assert re.search(r'(it must be|accepted:) \S', message), message
  assert '\n' not in message


@pytest.mark.parametrize('values,message', [
    ({'model.temperature.init': 5.0}, 'model.temperature.init=5.0 must lie in '
     '[model.temperature.min, model.temperature.max] = [0.0, 4.6'),
    ({'model.temperature.min': 3.0}, 'model.temperature.init=2.659'),
    ({'optim.warmup_steps': 7}, 'optim.warmup_steps=7 must be <= train.num_steps=6'),
    ({'train.microbatches': 3}, 'train.microbatches=3 must divide train.batch_size=16'),
    ({'data.val_fraction': 0.5, 'data.test_fraction': 0.5},
     'data.val_fraction + data.test_fraction = 1 leaves nothing for train'),
    ({'parallel.mesh.fsdp': -1}, 'only one axis may be -1 (the remaining devices), got data, '
     'fsdp'),
    ({'model.text.num_heads': 3}, 'model.text.num_heads=3 must divide model.text.width='),
])
def test_keys_that_do_not_fit_together_are_named(values, message):
  config = _config()
  for key, value in values.items():
    _set(config, key, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_utils.check_values(config)


def test_the_boundaries_of_the_cross_rules_are_accepted():
  config = _config()
  _set(config, 'optim.warmup_steps', config.train.num_steps)
  _set(config, 'model.temperature.init', config.model.temperature.max)
  _set(config, 'train.microbatches', 4)
  config_utils.check_values(config)


@pytest.mark.parametrize('flag,message', [
    ('--config.optim.learning_rate=-1', 'Config value optim.learning_rate=-1.0 is out of '
     'range: it must be a number > 0.'),
    ('--config.checkpoint.every_steps=-5', 'checkpoint.every_steps=-5 is out of range: it must '
     'be an integer >= 1, or 0 (only at the end'),
])
def test_the_command_line_gives_one_error_line_and_exit_status_2(tmp_path, flag, message):
  result = subprocess.run([sys.executable, '-m', 'vlm_jax.train', f'--config={TINY}',
                           f'--workdir={tmp_path}', flag], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and not os.listdir(tmp_path)
