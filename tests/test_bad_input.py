"""Bad input across the entry points: mistyped config values, configs that do not load, images
of any size and mode, captions too long or empty, workdirs without checkpoints, Hugging Face
folders with missing or damaged files, and what must never be read from user files (pickles,
paths outside a dataset's folder). Each gives one line, not a traceback."""
import ast
import glob
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax import cli
from vlm_jax import config_utils
from vlm_jax import losses
from vlm_jax import models
from vlm_jax.convert import __main__ as convert_main
from vlm_jax.convert import hf
from vlm_jax.data import caption_files
from vlm_jax.data import caption_lengths
from vlm_jax.data import datasets
from vlm_jax.data import image_text_folder
from vlm_jax.data import pipeline
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data import webdataset
from vlm_jax.inference import generation
from vlm_jax.inference import search
from vlm_jax.training import pretrained

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order

TINY = 'configs/clip_shapes.py:tiny'
ENV = dict(os.environ, XLA_FLAGS='')


def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env or ENV,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
  """Exit status 2, no traceback, and exactly one `error:` line, which holds `message`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


# ------------------------------------------------------------------------------ configs

@pytest.mark.parametrize('args,message', [
    (['--config.train.batch_size=abc'],
     'Bad value \'abc\' for config key "train.batch_size" (type int, default 16)'),
    (['--config.train.batch_size=(1,2)'], 'for config key "train.batch_size" (type int'),
    (['--config.data.flip=yes'], '"data.flip" (type bool, default False): expected true or false'),
])
def test_mistyped_config_values_are_one_line_errors(tmp_path, args, message):
  _one_line_error(_run('vlm_jax.train', f'--config={TINY}', f'--workdir={tmp_path}', *args),
                  message)
  assert not os.listdir(tmp_path)  # nothing started


@pytest.mark.parametrize('module,args', [
    ('vlm_jax.train', ['--config.loss.name=softmx', '--workdir={out}']),
    ('vlm_jax.evaluate', ['--config.loss.name=softmx', '--workdir={out}']),
    ('experiments.benchmarks.run', ['--config.loss.name=softmx', '--out={out}/bench.json']),
    ('experiments.sweep', ['--grid=loss.name=softmax,softmx', '--out={out}/sweep']),
])
def test_a_misspelt_choice_fails_at_start_in_every_entry_point(tmp_path, module, args):
  result = _run(module, f'--config={TINY}', *[a.format(out=tmp_path) for a in args])
  _one_line_error(result, "loss.name='softmx' is not accepted; accepted: 'sigmoid', 'softmax'.")
  assert not os.listdir(tmp_path)  # no run, no sweep directory


def test_unknown_variant_is_one_line_error(tmp_path):
  result = _run('vlm_jax.train', '--config=configs/clip_shapes.py:huge', f'--workdir={tmp_path}')
  _one_line_error(result, "Unknown variant 'huge' of clip_shapes; accepted: ['', 'bench', "
                          "'tiny']")


@pytest.mark.parametrize('key,value,message', [
    ('loss.name', 'softmx', "accepted: 'sigmoid', 'softmax'"),
    ('model.fusion.name', 'crossattention', "accepted: '', 'cross_attention', 'gated_xattn'"),
    ('model.name', 'clip', "'dual_encoder', 'fusion_encoder'"),
    ('model.image.pool', 'mean', "accepted: 'cls', 'map', 'gap'"),
    ('model.dtype', 'bf16', "'float32', 'bfloat16', 'float16'"),
    ('model.remat', 'True', "accepted: 'none', "),
    ('parallel.mode', 'pjit', "accepted: 'jit', 'pmap'"),
    ('optim.schedule', 'cos', "'cosine', 'linear', 'constant'"),
    ('data.name', 'coco', "'shapes', 'image_text_folder'"),
    ('train.nonfinite', 'ignore', "accepted: 'skip', 'stop'"),
    ('train.batch_size', 0, 'train.batch_size=0 is out of range: it must be an integer >= 1'),
    ('data.max_text_len', 1, 'data.max_text_len=1 is out of range: it must be an integer >= 2'),
    ('data.curriculum.steps', -1, 'data.curriculum.steps=-1 is out of range: it must be an '
     'integer >= 1, or 0 (off)'),
    ('loss.mlm_probability', 1.5, 'loss.mlm_probability=1.5 is out of range: it must be a '
     'number in [0, 1]'),
    ('loss.mlm_word_classes.spatial.probability', -0.1,
     'loss.mlm_word_classes.spatial.probability=-0.1 is out of range'),
])
def test_values_no_component_takes_are_named_with_what_is_accepted(key, value, message):
  config = cli._load_config_file(os.path.join(REPO, TINY))  # pylint: disable=protected-access
  group, leaf = key.rsplit('.', 1)
  setattr(_group(config, group), leaf, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    config_utils.check_values(config)


def _group(config, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_passes_the_value_checks_and_refuses_an_unknown_variant(path):
  for variant in ('', ':tiny'):
    config_utils.check_values(cli._load_config_file(path + variant))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='Unknown variant .nope.*accepted'):
    cli._load_config_file(path + ':nope')  # pylint: disable=protected-access


def test_own_value_errors_are_one_line_and_library_errors_keep_their_traceback():
  with pytest.raises(ValueError) as ours:
    losses.get_loss('softmx')
  assert cli.raised_by_own_code(ours.value)
  with pytest.raises(ValueError) as numpy_bug:
    np.zeros(4).reshape(3)
  assert not cli.raised_by_own_code(numpy_bug.value)
  main = ('import sys; from vlm_jax import cli, losses; import numpy as np; '
          'cli.run(lambda argv: losses.get_loss("softmx") if sys.argv[1:] == ["ours"] '
          'else np.zeros(4).reshape(3), positional=1)')
  run = lambda arg, env=ENV: subprocess.run([sys.executable, '-c', main, arg], cwd=REPO,
                                            env=env, capture_output=True, text=True,
                                            timeout=120)
  _one_line_error(run('ours'), "Unknown loss 'softmx'; accepted: sigmoid, softmax.")
  assert 'Traceback' in run('bug').stderr  # a bug outside our code is not hidden
  traced = run('ours', dict(ENV, **{cli.TRACEBACK_ENV: '1'}))
  assert traced.returncode == 1 and 'Traceback' in traced.stderr


def test_a_setup_value_error_of_a_real_run_is_one_line(shapes_small_dir, tmp_path):
  result = _run('vlm_jax.train', f'--config={TINY}', f'--workdir={tmp_path}',
                f'--config.data.data_dir={shapes_small_dir}', '--config.parallel.mesh.data=3')
  _one_line_error(result, "parallel.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not divide")


# ------------------------------------------------------------------------------ images

def _save(path, image: Image.Image, fmt='PNG') -> str:
  image.save(path, fmt)
  return str(path)


def test_generate_and_search_convert_images_of_any_size_and_mode(tmp_path):
  """`vlm_jax.generate` and `vlm_jax.search query` read --image with `generation.load_image`."""
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  cases = {
      'rgba.png': Image.fromarray(rgb).convert('RGBA'),
      'gray.png': Image.fromarray(rgb[..., 0]),
      'gray16.png': Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
      'palette.png': Image.fromarray(rgb).convert('P'),
      'cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
      'tiny.png': Image.fromarray(rgb[:3, :2]),
  }
  for name, image in cases.items():
    path = _save(tmp_path / name, image, 'JPEG' if name.endswith('jpg') else 'PNG')
    pixels = generation.load_image(path, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, name
  # 16-bit gray is scaled to 8 bits, not clipped to white.
  gray16 = generation.load_image(str(tmp_path / 'gray16.png'), 50, 'squash')
  assert abs(gray16.astype(float).mean() - rgb[..., 0].mean()) < 2
  for name, data in (('text.png', b'not an image'), ('cut.png', (tmp_path / 'gray.png')
                                                      .read_bytes()[:60]), ('empty.jpg', b'')):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"Cannot read image '.*{name}'"):
      generation.load_image(str(tmp_path / name), 32)


# ------------------------------------------------------------------------------ captions

def _reference_row_length(text: str) -> int:
  """BOS + words and punctuation runs (the tokenizer's Whitespace pre-tokenizer) + EOS."""
  return len(re.findall(r'\w+|[^\w\s]+', text)) + 2


def test_captions_longer_than_max_text_len_are_counted_and_warned(small_data_cfg, caplog):
  tok = datasets.load_tokenizer(small_data_cfg)
  source = datasets.data_source(small_data_cfg, 'train', raw=True)
  captions, read = caption_lengths.sample_captions(source)
  assert read == len(source) == 512 and len(captions) == 5 * 512
  lengths = np.asarray([_reference_row_length(c) for c in captions])
  np.testing.assert_array_equal(tok.row_lengths(captions), lengths)
  expected = int((lengths > 10).sum())
  assert 0 < expected < len(captions)
  small_data_cfg.max_text_len = 10
  with caplog.at_level(logging.WARNING):
    pipeline.make_train_dataset(small_data_cfg, tok, 16, seed=0)
  share = 100 * expected / len(captions)
  assert (f'{expected} of {len(captions)} train captions ({share:.1f}%) exceed '
          'data.max_text_len=10 tokens and are truncated, keeping their EOS;') in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    over, total = caption_lengths.warn_truncated(source, tok, 10, max_examples=100)
  assert total == 500 and over == int((lengths.reshape(512, 5)[np.unique(
      np.linspace(0, 511, 100).round().astype(int))] > 10).sum())
  assert 'counted on 100 evenly spaced of the 512 train examples' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # long enough for all: no warning
    assert caption_lengths.warn_truncated(source, tok, int(lengths.max()))[0] == 0
  assert 'exceed' not in caplog.text


def test_truncated_rows_keep_eos_and_fitting_rows_are_whole():
  tok = tokenizer_lib.train_tokenizer(['a b c d e f g h'])
  texts = ['a b', 'a b c d e f g h', '']
  np.testing.assert_array_equal(tok.row_lengths(texts), [4, 10, 2])
  ids, mask = tok.encode_batch(texts, 6)
  np.testing.assert_array_equal(mask.sum(1), [4, 6, 2])
  assert (ids[np.arange(3), mask.sum(1) - 1] == tok.eos_id).all()
  assert caption_lengths.count_truncated(tok, texts, 6) == 1
  assert caption_lengths.count_truncated(tok, [], 6) == 0


def test_empty_captions_in_a_folder_are_skipped_and_counted(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'')
  rows = [{'image': 'a.png', 'caption': 'a caption'}, {'image': 'a.png', 'caption': '   '},
          {'image': 'b.png', 'caption': ['', ' ']}, {'image': 'c.png', 'caption': None},
          {'image': '', 'caption': 'no image'}]
  with open(tmp_path / 'captions.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  samples, counts = caption_files.read_folder(str(tmp_path))
  assert [(s.image_id, s.captions) for s in samples] == [('a.png', ['a caption'])]
  assert counts == {'rows': 5, 'rows_without_caption': 3, 'rows_without_image': 1}


# ------------------------------------------------------------------------------ workdirs

def _workdir_without_checkpoint(path, data_dir):
  os.makedirs(path)
  (path / 'config.json').write_text(config_utils.to_json(tiny_config(data_dir)))
  return str(path)


def test_workdir_without_checkpoint_to_evaluate_and_search(shapes_small_dir, tmp_path):
  empty = _workdir_without_checkpoint(tmp_path / 'empty', shapes_small_dir)
  result = _run('vlm_jax.evaluate', f'--config={TINY}', f'--workdir={empty}',
                f'--config.data.data_dir={shapes_small_dir}')
  _one_line_error(result, f'No checkpoint in {empty}/checkpoints; train first with python -m '
                          'vlm_jax.train')
  with pytest.raises(search.SearchError, match='holds no parameters'):
    search.SearchModel(empty)
  result = _run('vlm_jax.search', 'index', f'--workdir={empty}', '--data=shapes:test',
                f'--db={tmp_path}/index.db')
  _one_line_error(result, 'holds no parameters: expected params/ (vlm_jax.convert) or '
                          'checkpoints/ with at least one step')
  (tmp_path / 'empty' / 'config.json').write_text('{"model": ')
  with pytest.raises(search.SearchError, match=r'config.json is not valid JSON'):
    search.SearchModel(empty)


# ------------------------------------------------------------------- Hugging Face folders

@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """A tiny randomly initialised CLIP exported as a Hugging Face folder (no torch needed)."""
  folder = str(tmp_path_factory.mktemp('hf_clip'))
  config = cli._load_config_file(os.path.join(REPO, TINY))  # pylint: disable=protected-access
  tok = tokenizer_lib.train_tokenizer(['a red circle', 'a blue square left of a cross'])
  config.model.text.vocab_size = tok.vocab_size
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  size, length = config.data.image_size, config.data.max_text_len
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3)),
                          np.zeros((1, length), np.int32), np.ones((1, length), bool))
  rng = np.random.default_rng(0)  # values do not matter here, only the files
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        nn.unbox(shapes['params']))
  hf.export_hf(config, params, tok, folder)
  return folder


def _damaged(hf_folder, tmp_path, damage) -> str:
  folder = tmp_path / 'hf'
  shutil.copytree(hf_folder, folder)
  damage(folder)
  return str(folder)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('damage,message', [
    (lambda f: (f / 'config.json').unlink(), r"No config.json in '.*hf': expected a Hugging "
                                             r'Face checkpoint folder'),
    (lambda f: (f / 'model.safetensors').unlink(), r'No model.safetensors \(or model.safetensors'
                                                   r'.index.json\) in .*\(found: config.json'),
    (lambda f: (f / 'model.safetensors').rename(f / 'pytorch_model.bin'),
     r'Only safetensors weights are read; re-save PyTorch .bin weights'),
    (lambda f: (f / 'config.json').write_text('{"model_type": '),
     r'config.json is not valid JSON \(Expecting value at line 1'),
    (lambda f: _truncate(f / 'model.safetensors'),
     r'model.safetensors is truncated or damaged: tensor .* needs bytes'),
    (lambda f: (f / 'model.safetensors').write_bytes(b'\x80\x04pickle'),
     r'model.safetensors is not a safetensors file'),
])
def test_hf_folder_with_missing_or_damaged_files(hf_folder, tmp_path, damage, message):
  folder = _damaged(hf_folder, tmp_path, damage)
  with pytest.raises((OSError, ValueError), match=message):
    convert_main.import_folder(folder, str(tmp_path / 'out'))


def test_hf_folder_errors_are_one_line_from_the_command_line(hf_folder, tmp_path):
  folder = _damaged(hf_folder, tmp_path, lambda f: (f / 'model.safetensors').unlink())
  result = _run('vlm_jax.convert', '--from=hf', f'--src={folder}', f'--dst={tmp_path}/out')
  _one_line_error(result, 'No model.safetensors')


def test_hf_folder_without_tokenizer_converts_but_its_text_tower_is_not_misread(
    hf_folder, tmp_path, caplog):
  folder = _damaged(hf_folder, tmp_path, lambda f: [p.unlink() for p in f.glob('tokenizer*')])
  work = str(tmp_path / 'work')
  with caplog.at_level(logging.WARNING):
    summary = convert_main.import_folder(folder, work)
  assert 'tokenizer' not in summary and 'converted without a tokenizer' in caplog.text
  config = tiny_config('unused')
  config.init.pretrained = work
  with pytest.raises(pretrained.PretrainedError, match='has no tokenizer, so its text tower'):
    pretrained.apply_config(config)
  config = tiny_config('unused')
  config.init.pretrained, config.init.include = work, ('image',)
  assert pretrained.apply_config(config) is not None  # the image tower alone is fine


# ------------------------------------------------------------------------------ safety

_UNPICKLING_MODULES = {'pickle', 'cPickle', 'dill', 'cloudpickle', 'joblib', 'marshal', 'shelve'}
_LOADERS = {'torch', 'np', 'numpy', 'yaml', 'pickle', 'joblib', 'dill'}  # their .load()


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, what) for imports of unpickling modules and calls that unpickle or run text."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + [getattr(node, 'module', None) or '']
      found += [(node.lineno, f'import {n}') for n in names
                if n.split('.')[0] in _UNPICKLING_MODULES]
    elif isinstance(node, ast.Call):
      func = node.func
      if isinstance(func, ast.Name) and func.id in ('eval', 'exec'):
        found.append((node.lineno, f'{func.id}()'))
      elif isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else ''
        if func.attr in ('load', 'loads') and owner in _LOADERS or func.attr == 'from_pretrained':
          found.append((node.lineno, f'{owner}.{func.attr}()'))
      found += [(node.lineno, 'allow_pickle') for k in node.keywords if k.arg == 'allow_pickle']
  return found


def test_nothing_unpickles_or_evaluates_user_files():
  """Checkpoints are orbax (tensorstore arrays + JSON), Hugging Face weights are read as
  safetensors by our own parser (never torch.load or transformers), configs and metadata as
  JSON. The only code run from a user's file is a config file (Python, documented as such,
  loaded with `exec_module`)."""
  found = []
  for root in ('vlm_jax', 'experiments'):
    for path in glob.glob(os.path.join(REPO, root, '**', '*.py'), recursive=True):
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      found += [f'{os.path.relpath(path, REPO)}:{line}: {what}'
                for line, what in _unsafe_calls(tree)]
  assert not found, found
  assert _unsafe_calls(ast.parse('import pickle\nx = np.load(p, allow_pickle=True)\n'
                                 'm = torch.load(p)\neval(s)\nM.from_pretrained(d)')) == [
      (1, 'import pickle'), (2, 'np.load()'), (2, 'allow_pickle'), (3, 'torch.load()'),
      (4, 'eval()'), (5, 'M.from_pretrained()')]


def test_webdataset_member_names_never_reach_the_filesystem(tmp_path):
  """Members are read from the archive into memory: names with `..` or a leading `/` are
  only keys, nothing is extracted, and their ids resolve to no file."""
  outside = tmp_path / 'outside'
  outside.mkdir()
  image = io.BytesIO()
  Image.new('RGB', (8, 8), (255, 0, 0)).save(image, 'PNG')
  shard = tmp_path / 'shards' / '00000.tar'
  shard.parent.mkdir()
  with tarfile.open(shard, 'w') as tar:
    for name, data in (('../outside/escape.png', image.getvalue()),
                       ('../outside/escape.txt', b'a red square'),
                       (f'{outside}/abs.png', image.getvalue()),
                       (f'{outside}/abs.txt', b'another red square')):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  samples = list(webdataset.read_shards([str(shard)]))
  assert [s.captions for s in samples] == [['a red square'], ['another red square']]
  assert all(s.problem is None and s.data == image.getvalue() and not s.path for s in samples)
  assert not os.listdir(outside)
  cfg = tiny_config(str(tmp_path / 'tfds')).data
  cfg.name, cfg.path = image_text_folder.NAME, str(shard.parent)
  assert all(image_text_folder.image_path(cfg, s.image_id) is None for s in samples)
