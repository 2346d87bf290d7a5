"""Starting from pretrained parameters: LiT keeps the locked image tower bit-identical, and
zero-shot evaluation runs straight from a converted Hugging Face checkpoint."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlm_jax.convert import rules
from vlm_jax.training import pretrained
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def clip_run(shapes_small_dir, tmp_path_factory):
  """A tiny CLIP trained for 2 steps: (workdir, final state)."""
  clip_dir = str(tmp_path_factory.mktemp('clip'))
  config = tiny_config(shapes_small_dir, num_steps=2)
  config.eval.splits = ('test_novel',)
  state, _ = trainer.train_and_evaluate(config, clip_dir)
  return clip_dir, state


@pytest.mark.slow
def test_lit_from_our_own_clip_keeps_the_image_tower(clip_run, shapes_small_dir, tmp_path):
  (clip_dir, clip_state), lit_dir = clip_run, str(tmp_path / 'lit')
  config = tiny_config(shapes_small_dir, num_steps=4)
  config.init.pretrained, config.init.include = clip_dir, ('image',)
  config.optim.frozen = ('image',)
  lit_state, results = trainer.train_and_evaluate(config, lit_dir)
  before = rules.flatten(jax.device_get(clip_state.params))
  after = rules.flatten(jax.device_get(lit_state.params))
  locked = [p for p in after if p.startswith('image')]
  assert locked and all(np.array_equal(after[p], before[p]) for p in locked)
  text = [p for p in after if p.startswith('text_encoder')]
  assert not all(np.array_equal(after[p], before[p]) for p in text)  # fresh, then trained
  # No optimizer state for the locked tower: Adam moments exist for trainable leaves only.
  trainable = sum(after[p].size for p in after if p not in locked)
  state_size = sum(x.size for x in jax.tree.leaves(lit_state.opt_state))
  assert 2 * trainable <= state_size < 2 * trainable + 16
  assert 0.0 <= results['eval/test_novel/zeroshot_top1'] <= 1.0


@pytest.mark.slow
def test_trained_workdir_exports_to_a_transformers_clip(clip_run, shapes_small_cfg, tmp_path):
  """--to=hf from a training workdir: transformers' CLIPModel gives our embeddings."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from vlm_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import hf, workdir  # pylint: disable=g-import-not-at-top
  clip_dir, _ = clip_run
  assert 'CLIPModel' in convert_main.export_workdir(clip_dir, str(tmp_path / 'hf'))
  config, params, tokenizer = workdir.load(clip_dir)
  model = hf.build(config)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ids, mask = tokenizer.encode_batch(['a small red circle', 'a blue square'], 16)
  ours = model.apply({'params': params}, images, ids, mask)
  theirs = transformers.CLIPModel.from_pretrained(str(tmp_path / 'hf')).eval()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(ours['image_emb'], out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(ours['text_emb'], out.text_embeds.numpy(), atol=1e-5)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  assert hf_tok('A small red circle')['input_ids'] == list(ids[0][mask[0]])


def test_include_that_matches_nothing_is_an_error(tmp_path, shapes_small_dir):
  from vlm_jax.convert import workdir  # pylint: disable=g-import-not-at-top
  config = tiny_config(shapes_small_dir)
  config.model.text.vocab_size = 40
  os.makedirs(tmp_path / 'pre')
  with open(tmp_path / 'pre' / 'config.json', 'w') as f:
    f.write(json.dumps(config.to_dict(), default=list))
  assert workdir.read_config(str(tmp_path / 'pre')).model.text.vocab_size == 40
  config.init.pretrained, config.init.include = str(tmp_path / 'pre'), ('imgae',)
  with pytest.raises(pretrained.PretrainedError, match=r"matches no parameter.*image_encoder"):
    pretrained.apply_config(config)


@pytest.mark.slow
def test_zero_shot_from_a_converted_hf_clip(shapes_small_dir, tmp_path):
  """`python -m vlm_jax.evaluate --config=configs/clip_vit_b16.py --config.init.pretrained=W`
  on shapes: a 64 px checkpoint (4 x 4 positions, resized to 2 x 2) on 32 px images."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import hf_reference as ref  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top
  ref.build('clip', str(tmp_path / 'hf'))
  work = str(tmp_path / 'work')
  convert_main.import_folder(str(tmp_path / 'hf'), work)
  result = subprocess.run(
      [sys.executable, '-m', 'vlm_jax.evaluate', '--config=configs/clip_vit_b16.py:tiny',
       f'--config.init.pretrained={work}', f'--config.data.data_dir={shapes_small_dir}',
       '--config.eval.max_examples=64', '--config.eval.splits=("test_novel",)'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval/test_novel/zeroshot_top1' in result.stdout
  assert 'init.pretrained=' in result.stderr and 'patch_size' in result.stderr


def test_convert_cli_help_and_one_line_errors(tmp_path):
  run = lambda *args: subprocess.run([sys.executable, '-m', 'vlm_jax.convert', *args],
                                     cwd=REPO, capture_output=True, text=True, timeout=120)
  result = run('--help')
  for flag in ('--from', '--to', '--src', '--dst', '--family', 'overwrite'):
    assert flag in result.stdout
  os.makedirs(tmp_path / 'work')
  with open(tmp_path / 'work' / 'config.json', 'w') as f:
    json.dump({'model': {'image': {'rope_theta': 1.0}}}, f)
  result = run('--to=hf', f'--src={tmp_path / "work"}', f'--dst={tmp_path / "out"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "'model.image.rope_theta'" in result.stderr.strip().splitlines()[-1]
