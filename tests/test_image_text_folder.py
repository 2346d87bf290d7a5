"""The image_text_folder dataset: folders with bad files, csv and jsonl, splits, WebDataset
shards, image conversion, and a tiny end-to-end run of configs/clip_folder.py."""
import csv
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from vlm_jax import defaults
from vlm_jax.data import caption_files
from vlm_jax.data import datasets
from vlm_jax.data import image_convert
from vlm_jax.data import image_text_folder
from vlm_jax.data import pipeline
from vlm_jax.data import webdataset


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, 'PNG')
  return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def _photo(seed: int, height: int = 30, width: int = 40) -> np.ndarray:
  """A random uint8 [H, W, 3] picture."""
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _data_cfg(path, data_dir, **overrides):
  cfg = defaults.base_config().data
  cfg.name, cfg.path, cfg.data_dir, cfg.image_size = 'image_text_folder', str(path), str(
      data_dir), 16
  cfg.update(overrides)
  return cfg


def _write_rows(folder, rows, fmt):
  if fmt == 'csv':
    with open(folder / 'captions.csv', 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
      writer.writeheader()
      writer.writerows(rows)
  else:
    with open(folder / 'captions.jsonl', 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')


def _bad_folder(root, fmt='csv'):
  """A folder with 6 usable images of every mode and 5 unusable ones (see the test)."""
  folder = root / 'photos'
  (folder / 'sub').mkdir(parents=True)
  files = {
      'rgb.jpg': _jpeg(_photo(0)),
      'sub/wide.png': _png(_photo(1, 20, 60)),
      'gray.png': _png(np.full((24, 24), 100, np.uint8), 'L'),
      'rgba.png': _png(np.zeros((24, 24, 4), np.uint8), 'RGBA'),  # fully transparent
      'sixteen.png': _png(np.full((24, 24), 32768, np.uint16)),  # mode I;16
      'truncated.jpg': _jpeg(_photo(2, 64, 64))[:3000],
      'text.png': b'this is not an image\n',
  }
  palette = Image.fromarray(np.full((24, 24), 3, np.uint8), 'P')
  palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 756)
  buffer = io.BytesIO()
  palette.save(buffer, 'PNG')
  files['palette.png'] = buffer.getvalue()
  for name, data in files.items():
    (folder / name).write_bytes(data)
  (root / 'outside.jpg').write_bytes(_jpeg(_photo(3)))  # exists, but outside the folder
  rows = [
      {'image': 'rgb.jpg', 'caption': 'a random photo', 'label': 'noise'},
      {'image': './rgb.jpg', 'caption': 'colourful noise', 'label': 'noise'},
      {'image': 'sub/wide.png', 'caption': 'a wide picture', 'label': 'noise'},
      {'image': 'gray.png', 'caption': 'a gray square', 'label': 'gray'},
      {'image': 'rgba.png', 'caption': 'a transparent square', 'label': 'white'},
      {'image': 'palette.png', 'caption': 'a dark blue square', 'label': ''},
      {'image': 'sixteen.png', 'caption': 'a sixteen bit square', 'label': 'gray'},
      {'image': 'truncated.jpg', 'caption': 'half a photo', 'label': 'noise'},
      {'image': 'text.png', 'caption': 'not a picture', 'label': 'noise'},
      {'image': 'missing.jpg', 'caption': 'nothing here', 'label': 'noise'},
      {'image': '../outside.jpg', 'caption': 'escapes the folder', 'label': 'noise'},
      {'image': str(root / 'outside.jpg'), 'caption': 'absolute path', 'label': 'noise'},
      {'image': 'gray.png', 'caption': '', 'label': 'gray'},
  ]
  _write_rows(folder, rows, fmt)
  return folder


def _all_examples(cfg):
  return {ex['image_id'].decode(): ex for split in datasets.split_names(cfg)
          for ex in datasets.data_source(cfg, split)}


@pytest.mark.parametrize('fmt', ['csv', 'jsonl'])
def test_bad_files_are_skipped_counted_and_reported(tmp_path, fmt):
  folder = _bad_folder(tmp_path, fmt)
  cfg = _data_cfg(folder, tmp_path / 'tfds', val_fraction=0.2, test_fraction=0.2)
  info = datasets.ensure_built(cfg)
  with open(image_text_folder.report_path(cfg)) as f:
    report = json.load(f)
  assert report['skipped'] == {'rejected': 2, 'missing': 1, 'unreadable': 0, 'corrupt': 2}
  assert report['usable'] == 6 and report['images'] == 11
  assert report['rows'] == 13 and report['rows_without_caption'] == 1
  assert report['captions'] == 7  # rgb.jpg has two
  reasons = {s['image']: s['reason'] for s in report['skipped_images']}
  assert reasons == {'truncated.jpg': 'corrupt', 'text.png': 'corrupt',
                     'missing.jpg': 'missing', '../outside.jpg': 'rejected',
                     str(tmp_path / 'outside.jpg'): 'rejected'}
  assert report['source_modes'] == {'I;16': 1, 'L': 1, 'P': 1, 'RGB': 2, 'RGBA': 1}
  assert report['classes'] == ['gray', 'noise', 'white'] and report['unlabelled'] == 1
  assert report['splits'] == {'train': 4, 'validation': 1, 'test': 1}
  assert {k: v.num_examples for k, v in info.splits.items()} == report['splits']
  examples = _all_examples(cfg)
  assert set(examples) == {'rgb.jpg', 'sub/wide.png', 'gray.png', 'rgba.png', 'palette.png',
                           'sixteen.png'}
  assert [c.decode() for c in examples['rgb.jpg']['captions']] == [
      'a random photo', 'colourful noise']
  names = datasets.class_names(cfg)
  label = lambda image: examples[image]['label']
  assert names == ['gray', 'noise', 'white'] and label('palette.png') == -1
  assert names[label('rgba.png')] == 'white' and names[label('sixteen.png')] == 'gray'
  for image, rgb in (('gray.png', 100), ('rgba.png', 255), ('sixteen.png', 128)):
    np.testing.assert_array_equal(examples[image]['image'], np.full((16, 16, 3), rgb))
  np.testing.assert_array_equal(examples['palette.png']['image'][0, 0], [10, 20, 30])
  assert all(ex['image'].shape == (16, 16, 3) for ex in examples.values())


def test_csv_and_jsonl_build_the_same_examples(tmp_path):
  built = {}
  for fmt in ('csv', 'jsonl'):
    folder = _bad_folder(tmp_path / fmt, fmt)
    cfg = _data_cfg(folder, tmp_path / 'tfds', val_fraction=0.2, test_fraction=0.2)
    datasets.ensure_built(cfg)
    built[fmt] = {k: (ex['image'].tobytes(), list(ex['captions']), ex['label'])
                  for k, ex in _all_examples(cfg).items()}
  assert built['csv'] == built['jsonl']


def test_the_build_is_cached_until_the_captions_change(tmp_path):
  folder = _bad_folder(tmp_path)
  cfg = _data_cfg(folder, tmp_path / 'tfds')
  first = image_text_folder.builder_config(cfg).name
  datasets.ensure_built(cfg)
  assert datasets.raw_image_shape(cfg) is None  # PNG files, not raw pixels
  report = image_text_folder.report_path(cfg)
  built_at = os.stat(report).st_mtime_ns
  (folder / 'rgb.jpg').touch()  # images are not part of the key; the captions file is
  datasets.ensure_built(cfg)
  assert os.stat(report).st_mtime_ns == built_at  # reused, not rebuilt
  assert os.path.isfile(datasets.tokenizer_path(cfg))
  cfg.image_size = 32  # another setting, another build
  assert image_text_folder.builder_config(cfg).name != first
  cfg.image_size = 16
  with open(folder / 'captions.csv', 'a') as f:
    f.write('one more caption,gray.png,gray\n')  # columns: caption, image, label
  assert image_text_folder.builder_config(cfg).name != first
  datasets.ensure_built(cfg)
  assert image_text_folder.report_path(cfg) != report and os.path.isfile(report)
  examples = _all_examples(cfg)
  assert len(examples['gray.png']['captions']) == 2


def test_seeded_split_is_deterministic_and_stable():
  ids = [f'img{i:03d}.jpg' for i in range(100)]
  given = [''] * 100
  a = caption_files.assign_splits(ids, given, 0.1, 0.2, seed=0)
  assert a == caption_files.assign_splits(ids, given, 0.1, 0.2, seed=0)
  assert a.count('test') == 20 and a.count('validation') == 10 and a.count('train') == 70
  assert a != caption_files.assign_splits(ids, given, 0.1, 0.2, seed=1)
  # One image more moves at most the images at the split boundaries.
  b = caption_files.assign_splits(ids + ['new.jpg'], given + [''], 0.1, 0.2, seed=0)
  assert sum(x != y for x, y in zip(a, b)) <= 2
  given[:3] = ['test', 'test_extra', 'validation']
  c = caption_files.assign_splits(ids, given, 0.1, 0.2, seed=0)
  assert c[:3] == ['test', 'test_extra', 'validation']
  with pytest.raises(ValueError, match='Only 2 usable image'):
    caption_files.assign_splits(['a', 'b'], ['', ''], 0.1, 0.1, seed=0)
  with pytest.raises(ValueError, match='leaves nothing for train'):
    caption_files.assign_splits(ids, given, 0.5, 0.5, seed=0)


def test_split_and_label_columns(tmp_path):
  folder = tmp_path / 'f'
  folder.mkdir()
  rows = []
  for i in range(8):
    (folder / f'{i}.png').write_bytes(_png(_photo(i, 8, 8)))
    rows.append({'image': f'{i}.png', 'caption': f'picture {i}',
                 'split': ['train', 'val', 'TEST', ''][i % 4]})
  _write_rows(folder, rows, 'csv')
  cfg = _data_cfg(folder, tmp_path / 'tfds', val_fraction=0.0, test_fraction=0.0)
  info = datasets.ensure_built(cfg)
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      'train': 4, 'validation': 2, 'test': 2}
  assert datasets.class_names(cfg) == []  # no label column: no zero-shot classes
  _write_rows(folder, rows + [{'image': '0.png', 'caption': 'again', 'split': 'test'}], 'csv')
  with pytest.raises(ValueError, match="'0.png' has split 'test' here but 'train'"):
    datasets.ensure_built(cfg)


def test_bad_index_files(tmp_path):
  folder = tmp_path / 'f'
  folder.mkdir()
  cfg = _data_cfg(folder, tmp_path / 'tfds')
  with pytest.raises(ValueError, match='no data'):
    datasets.ensure_built(cfg)
  (folder / 'captions.csv').write_text('file,text\na.png,hello\n')
  with pytest.raises(ValueError, match=r"lacks the column\(s\) \['image', 'caption'\]"):
    datasets.ensure_built(cfg)
  (folder / 'captions.jsonl').write_text('{}')
  with pytest.raises(ValueError, match='both captions.csv and captions.jsonl'):
    datasets.ensure_built(cfg)
  (folder / 'captions.csv').unlink()
  (folder / 'captions.jsonl').write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
  with pytest.raises(ValueError, match='captions.jsonl:2: not valid JSON'):
    datasets.ensure_built(cfg)
  cfg.path = ''
  with pytest.raises(ValueError, match='needs --config.data.path'):
    datasets.get_builder(cfg)


def test_zero_usable_images_is_a_clear_error(tmp_path):
  folder = tmp_path / 'f'
  folder.mkdir()
  (folder / 'a.png').write_text('not an image')
  _write_rows(folder, [{'image': 'a.png', 'caption': 'x'}, {'image': 'b.png', 'caption': 'y'},
                       {'image': '../c.png', 'caption': 'z'}], 'csv')
  cfg = _data_cfg(folder, tmp_path / 'tfds')
  with pytest.raises(ValueError, match=r"No usable images in data.path=.*'rejected': 1, "
                     r"'missing': 1, 'unreadable': 0, 'corrupt': 1"):
    datasets.ensure_built(cfg)
  assert not image_text_folder.make_builder(cfg).is_prepared()


def test_path_escapes_are_rejected():
  folder = '/data/photos'
  assert caption_files.resolve_image(folder, 'a/b.jpg') == '/data/photos/a/b.jpg'
  assert caption_files.resolve_image(folder, 'a/../b.jpg') == '/data/photos/b.jpg'
  for bad in ('../x.jpg', '../../x.jpg', 'a/../../x.jpg', '/etc/passwd', '..', 'C:/x.jpg'):
    assert caption_files.resolve_image(folder, bad) is None, bad


def test_conversion_of_modes_and_resizing():
  wide = np.zeros((10, 30, 3), np.uint8)
  wide[:, 10:20] = 255  # a white centre square in a black band
  cropped, mode = image_convert.decode(_png(wide), 10, 'crop')
  assert mode == 'RGB'
  np.testing.assert_array_equal(cropped, np.full((10, 10, 3), 255))  # only the centre left
  squashed, _ = image_convert.decode(_png(wide), 10, 'squash')
  assert squashed[:, 0].max() < 40 and squashed[:, 5].min() > 200
  cmyk = io.BytesIO()
  Image.new('CMYK', (12, 12), (0, 255, 255, 0)).save(cmyk, 'JPEG', quality=100)
  red, mode = image_convert.decode(cmyk.getvalue(), 8)
  assert mode == 'CMYK' and np.abs(red.astype(int) - [255, 0, 0]).max() < 8
  half = Image.fromarray(np.full((4, 4), 0.5, np.float32), 'F')
  assert image_convert.to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
  with pytest.raises(ValueError, match="accepted: \\('crop', 'squash'\\)"):
    image_convert.decode(_png(wide), 10, 'pad')


def test_brace_patterns():
  assert webdataset.expand_braces('s/{00000..00002}.tar') == [
      's/00000.tar', 's/00001.tar', 's/00002.tar']
  assert webdataset.expand_braces('{a,b}-{8..10}') == ['a-8', 'a-9', 'a-10', 'b-8', 'b-9',
                                                       'b-10']
  with pytest.raises(ValueError, match='runs backwards'):
    webdataset.expand_braces('{3..1}.tar')


def _write_shard(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  for s in range(2):
    members = []
    for k in range(6):
      key = f'{s:05d}{k:04d}'
      members.append((f'{key}.jpg' if k % 2 else f'{key}.png',
                      _jpeg(_photo(10 * s + k)) if k % 2 else _png(_photo(10 * s + k))))
      if k % 3 == 0:
        members.append((f'{key}.txt', f'shard {s} key {k}'.encode()))
      members.append((f'{key}.json', json.dumps(
          {'caption': f'json caption {s} {k}', 'label': ['odd', 'even'][k % 2 == 0],
           'key': key}).encode()))
    members += [('0000ff.txt', b'a caption without image'),
                ('0000fe.webp', b'RIFF....WEBPVP8 broken'), ('0000fe.txt', b'broken webp'),
                ('0000fd.json', b'{"url": "no caption"}'), ('0000fd.jpg', _jpeg(_photo(98)))]
    _write_shard(shards / f'{s:05d}.tar', members)
  (shards / '_stats.json').write_text('{}')  # img2dataset writes these beside the shards
  by_dir = _data_cfg(shards, tmp_path / 'tfds', val_fraction=0.0, test_fraction=0.25)
  info = datasets.ensure_built(by_dir)
  with open(image_text_folder.report_path(by_dir)) as f:
    report = json.load(f)
  assert report['kind'] == 'webdataset' and report['shards'] == 2
  assert report['skipped'] == {'corrupt': 2, 'no_image': 2, 'no_caption': 2, 'bad_caption': 0,
                               'duplicate': 0, 'missing_shard': 0, 'bad_shard': 0}
  assert report['usable'] == 12 and report['images'] == 18
  assert report['classes'] == ['even', 'odd']
  assert {k: v.num_examples for k, v in info.splits.items()} == {'train': 9, 'test': 3}
  examples = _all_examples(by_dir)
  caps = lambda key: [c.decode() for c in examples[key]['captions']]
  assert caps('00001.tar/000010000') == ['shard 1 key 0']  # .txt wins over .json
  assert caps('00000.tar/000000001') == ['json caption 0 1']
  assert datasets.class_names(by_dir)[examples['00000.tar/000000001']['label']] == 'odd'
  by_pattern = by_dir.copy_and_resolve_references()
  by_pattern.path = str(shards / '{00000..00002}.tar')  # 00002.tar does not exist
  datasets.ensure_built(by_pattern)
  with open(image_text_folder.report_path(by_pattern)) as f:
    report = json.load(f)
  assert report['skipped']['missing_shard'] == 1 and report['usable'] == 12
  assert report['images'] == 18  # a missing shard is not an image
  broken = tmp_path / 'broken'
  broken.mkdir()
  data = (shards / '00000.tar').read_bytes()
  (broken / 'a.tar').write_bytes(data[:len(data) * 2 // 3])
  cfg = _data_cfg(broken, tmp_path / 'tfds', val_fraction=0.0, test_fraction=0.0)
  datasets.ensure_built(cfg)
  with open(image_text_folder.report_path(cfg)) as f:
    report = json.load(f)
  assert report['skipped']['bad_shard'] == 1 and 0 < report['usable'] < 6


def test_image_path_of_a_built_example(tmp_path):
  folder = _bad_folder(tmp_path)
  cfg = _data_cfg(folder, tmp_path / 'tfds')
  assert image_text_folder.image_path(cfg, 'sub/wide.png') == str(folder / 'sub' / 'wide.png')
  assert image_text_folder.image_path(cfg, '../outside.jpg') is None


@pytest.mark.slow
def test_clip_folder_trains_and_evaluates(tmp_path, caplog):
  from tests.run_configs import tiny_config  # pylint: disable=g-import-not-at-top
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'colours'
  folder.mkdir()
  colours = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220),
             'yellow': (230, 220, 30)}
  rng = np.random.default_rng(0)
  rows = []
  for i in range(64):
    name = list(colours)[i % 4]
    pixels = np.clip(np.asarray(colours[name]) + rng.normal(0, 20, (20, 20, 3)), 0, 255)
    (folder / f'{i}.png').write_bytes(_png(pixels.astype(np.uint8)))
    rows += [{'image': f'{i}.png', 'caption': f'a {name} square', 'label': name},
             {'image': f'{i}.png', 'caption': f'something {name}', 'label': name}]
  _write_rows(folder, rows, 'jsonl')
  config = tiny_config(tmp_path / 'tfds', 'clip_folder', num_steps=4)
  config.data.path = str(folder)
  state, results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 0.0 <= results['eval/test/zeroshot_top1'] <= 1.0
  with open(tmp_path / 'run' / runner.TEMPLATES_FILE) as f:  # derived from the captions
    assert json.load(f) == {'source': 'captions', 'templates': ['a {} square', 'something {}']}
  assert 'eval/test/i2t_recall@1' in results and 'eval/test/t2i_recall@5' in results
  with open(tmp_path / 'run' / 'results.json') as f:
    assert json.load(f) == pytest.approx(results)
  examples = pipeline.eval_examples(config.data, 'test')
  assert len(examples['label']) == 6 and (examples['label'] >= 0).all()
  # The same images without labels: retrieval only, and a log line says why.
  no_labels = tmp_path / 'nolabels'
  no_labels.mkdir()
  for row in rows:
    row.pop('label')
    (no_labels / row['image']).write_bytes((folder / row['image']).read_bytes())
  _write_rows(no_labels, rows, 'csv')
  unlabelled = config.copy_and_resolve_references()
  unlabelled.data.path = str(no_labels)
  datasets.ensure_built(unlabelled.data)
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  with caplog.at_level('INFO'):
    results = runner.evaluate(unlabelled, model, state.params,
                              datasets.load_tokenizer(config.data))
  assert not any('zeroshot' in k for k in results) and 'eval/test/i2t_recall@1' in results
  assert 'Zero-shot evaluation skipped' in caplog.text


def _labelled_folder(folder, captions):
  """One tiny image per (caption, label) pair of `captions`, written as captions.csv; the
  first is the test split, with a second caption 'a test LABEL'; the rest are train."""
  folder.mkdir()
  rows = []
  for i, (caption, label) in enumerate(captions):
    (folder / f'{i}.png').write_bytes(_png(_photo(i, 8, 8)))
    rows.append({'image': f'{i}.png', 'caption': caption, 'label': label,
                 'split': 'test' if i == 0 else 'train'})
  label = captions[0][1]
  rows.append({'image': '0.png', 'caption': f'a test {label}', 'label': label, 'split': 'test'})
  _write_rows(folder, rows, 'csv')


def _recorded_templates(config, workdir):
  from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top
  datasets.ensure_built(config.data)
  workdir.mkdir(exist_ok=True)
  runner.record_prompt_templates(config, str(workdir))
  with open(workdir / runner.TEMPLATES_FILE) as f:
    return json.load(f)


def test_zeroshot_templates_come_from_the_captions(tmp_path, caplog):
  from tests.run_configs import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / 'tfds', 'clip_folder')
  config.data.path, config.data.image_size = str(tmp_path / 'digits'), 16
  _labelled_folder(tmp_path / 'digits', [
      ('the digit seven', 'seven'), ('the digit one', 'one'), ('a scan of a one', 'one'),
      ('a handwritten 7', 'seven'), ('the digit one', 'one'), ('a one or a seven', 'one')])
  with caplog.at_level('INFO'):
    recorded = _recorded_templates(config, tmp_path / 'run')
  assert recorded == {'source': 'captions', 'templates': ['the digit {}', 'a scan of a {}']}
  assert "Zero-shot prompt templates (from captions): ['the digit {}'" in caplog.text
  config.eval.prompt_templates = ('a {} thing',)  # an explicit choice wins
  assert _recorded_templates(config, tmp_path / 'run') == {
      'source': 'config', 'templates': ['a {} thing']}
  # Captions that never name a label: the photo template.
  config.eval.prompt_templates = ()
  config.data.path = str(tmp_path / 'unnamed')
  _labelled_folder(tmp_path / 'unnamed', [('a picture', 'cat'), ('another', 'dog')])
  assert _recorded_templates(config, tmp_path / 'run') == {
      'source': 'photo', 'templates': ['a photo of a {}.']}


def test_digits_folder_varied_wordings_are_seeded():
  from experiments import make_digits_folder as digits  # pylint: disable=g-import-not-at-top
  varied = digits.caption_wordings(40, 'varied', seed=0)
  assert varied == digits.caption_wordings(40, 'varied', seed=0)
  assert varied != digits.caption_wordings(40, 'varied', seed=1)
  assert all(a != b and {a, b} <= set(digits.VARIED_WORDINGS) for a, b in varied)
  assert len({w for pair in varied for w in pair}) == len(digits.VARIED_WORDINGS)
  assert digits.caption_wordings(2, 'fixed') == [digits.FIXED_WORDINGS] * 2
  assert varied[0][0].format(name='seven', digit=7) in (
      'a handwritten seven', 'the digit seven', 'a scan of the number seven',
      'the handwritten number seven', 'a scanned digit seven', 'a seven written by hand')


def test_symbolic_links_out_of_the_folder_are_refused(tmp_path):
  root = tmp_path / 'root'
  folder, elsewhere = root / 'photos', root / 'elsewhere'
  folder.mkdir(parents=True)
  elsewhere.mkdir()
  for name in ('inside.png', 'target.png'):
    (folder / name).write_bytes(_png(_photo(0)))
  (elsewhere / 'secret.png').write_bytes(_png(_photo(1)))
  os.symlink(elsewhere / 'secret.png', folder / 'link_out.png')  # a file link out
  os.symlink(elsewhere, folder / 'dir_out')  # a folder link out
  os.symlink(folder / 'target.png', folder / 'link_in.png')  # stays inside: followed
  images = ['inside.png', 'link_in.png', 'link_out.png', 'dir_out/secret.png']
  _write_rows(folder, [{'image': i, 'caption': f'photo {i}'} for i in images], 'csv')
  assert caption_files.resolve_image(str(folder), 'link_in.png') == str(folder / 'link_in.png')
  assert caption_files.resolve_image(str(folder), 'link_out.png') is None
  cfg = _data_cfg(folder, tmp_path / 'tfds', val_fraction=0.0, test_fraction=0.0)
  datasets.ensure_built(cfg)
  with open(image_text_folder.report_path(cfg)) as f:
    report = json.load(f)
  assert report['usable'] == 2 and report['skipped']['rejected'] == 2
  assert {s['image']: s['detail'] for s in report['skipped_images']} == {
      name: 'a symbolic link on its path leads outside the folder'
      for name in ('link_out.png', 'dir_out/secret.png')}
  shards = tmp_path / 'shards'
  shards.mkdir()
  (elsewhere / 'x.tar').write_bytes(b'')
  os.symlink(elsewhere / 'x.tar', shards / '00000.tar')
  with pytest.raises(ValueError, match=r"the shard '00000.tar' is a symbolic link to .*x.tar', "
                                       'outside the folder'):
    webdataset.resolve_shards(str(shards))
