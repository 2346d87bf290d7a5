"""Multimodal search in Milvus Lite (`vlm_jax.inference.search`, `python -m vlm_jax.search`):
exact top-10 against NumPy, idempotent re-indexing, the index's checks, the command line."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax import models
from vlm_jax.convert import workdir as workdir_lib
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.inference import generation
from vlm_jax.inference import search
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order

NUM_TEST = 128  # images in shapes/32px_small's test split, 5 captions each
K = 10


def random_workdir(path: str, data_dir: str, seed: int = 0, embed_dim: int = 32) -> str:
  """A randomly initialised tiny CLIP saved as a pretrained workdir (config, params/,
  tokenizer.json), as `python -m vlm_jax.convert` writes one."""
  config = tiny_config(data_dir)
  config.model.embed_dim = embed_dim
  tokenizer = datasets.load_tokenizer(config.data)
  trainer.resolve_config(config, tokenizer)
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  batch = trainer.dummy_batch(config)
  params = nn.unbox(model.init(jax.random.key(seed), batch['image'], batch['text_ids'],
                               batch['text_mask'])['params'])
  workdir_lib.save(path, config, params, tokenizer)
  return path


@pytest.fixture(scope='module')
def workdir(shapes_small_dir, tmp_path_factory):
  return random_workdir(str(tmp_path_factory.mktemp('clip')), shapes_small_dir)


@pytest.fixture(scope='module')
def model(workdir):
  return search.SearchModel(workdir)


@pytest.fixture(scope='module')
def db(model, tmp_path_factory):
  """An index of shapes/32px_small test in collection 'shapes_test'."""
  path = str(tmp_path_factory.mktemp('search') / 'index.db')
  stats = search.build_index(model, path, 'shapes:test')
  assert (stats['images'], stats['captions'], stats['embed_dim']) == (NUM_TEST, 5 * NUM_TEST, 32)
  return path


def exported(db_path: str, out: str) -> tuple[np.ndarray, list[dict]]:
  assert search.export(db_path, out) == {'shapes_test': NUM_TEST,
                                         'shapes_test_captions': 5 * NUM_TEST}
  rows = [json.loads(line) for line in open(os.path.join(out, 'shapes_test.jsonl'))]
  return np.load(os.path.join(out, 'shapes_test.npy')), rows


def test_milvus_top10_is_exact_numpy_top10(workdir, model, db, shapes_small_dir, tmp_path):
  # The stored vectors are the model's embeddings of the split, in id order ...
  config, params, _ = workdir_lib.load(workdir)
  flax_model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  examples = pipeline.eval_examples(config.data, 'test')
  reference = np.asarray(flax_model.apply({'params': params}, examples['image'],
                                          method=flax_model.encode_image), np.float64)
  reference /= np.linalg.norm(reference, axis=-1, keepdims=True)
  vectors, rows = exported(db, str(tmp_path / 'export'))
  np.testing.assert_allclose(vectors, reference, atol=2e-5)
  assert [r['id'] for r in rows] == list(range(NUM_TEST))
  assert [r['captions'] for r in rows] == examples['captions']
  first = rows[7]['image']
  assert first == 'shapes/32px_small:test[7]'
  np.testing.assert_array_equal(search.image_of(first, shapes_small_dir),
                                datasets.data_source(config.data, 'test')[7]['image'])

  # ... and Milvus' top 10 of text and image queries is NumPy's exact top 10 on them.
  queries = np.concatenate([model.texts(['a red circle', 'a blue square', 'a green cross',
                                         'two shapes', 'a small yellow diamond']),
                            vectors[[0, 5, 50, 127]]])
  expected = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)
  client = search.open_client(db)
  try:
    hits = search.search_vectors(client, 'shapes_test', queries, K)
  finally:
    client.close()
  recall = np.mean([len({h['id'] for h in row} & set(exp[:K])) / K
                    for row, exp in zip(hits, expected)])
  assert recall == 1.0
  for row, query in zip(hits, queries):
    assert [h['score'] for h in row] == sorted((h['score'] for h in row), reverse=True)
    np.testing.assert_allclose([h['score'] for h in row],
                               vectors[[h['id'] for h in row]] @ query, atol=1e-5)

  # End to end through `query`: the text is embedded by the workdir the index names.
  top = search.query(db, text='a red circle', k=K, collection='shapes_test')
  assert [h['id'] for h in top] == [h['id'] for h in hits[0]]
  assert set(top[0]) == {'id', 'score', 'caption', 'label', 'image'}
  captions = search.query(db, text='a red circle', k=3, collection='shapes_test',
                          target='captions', model=model)
  assert all(rows[h['image_id']]['captions'].count(h['caption']) for h in captions)


def test_reindexing_replaces_instead_of_duplicating(model, db):
  query = lambda: search.query(db, text='a blue square', k=K, collection='shapes_test',
                               model=model)
  before = query()
  stats = search.build_index(model, db, 'shapes:test')
  assert (stats['images'], stats['captions']) == (NUM_TEST, 5 * NUM_TEST)
  client = search.open_client(db)
  try:
    assert {'shapes_test', 'shapes_test_captions'} <= set(client.list_collections())
    assert not [c for c in client.list_collections() if c.endswith('__building')]
    for name, count in (('shapes_test', NUM_TEST), ('shapes_test_captions', 5 * NUM_TEST)):
      client.load_collection(name)
      assert client.query(name, filter='', output_fields=['count(*)'])[0]['count(*)'] == count
  finally:
    client.close()
  assert query() == before


def test_another_index_in_the_same_db_needs_a_collection(model, db):
  search.build_index(model, db, 'shapes:validation', collection='val', max_examples=16)
  with pytest.raises(search.SearchError, match=r'several indexes \(shapes_test, val\)'):
    search.query(db, text='a red circle', model=model)
  hits = search.query(db, text='a red circle', collection='val', k=20, model=model)
  assert len(hits) == 16 and all(h['image'].startswith('shapes/32px_small:validation[')
                                 for h in hits)
  with pytest.raises(search.SearchError, match="has no index 'nope'"):
    search.query(db, text='a red circle', collection='nope', model=model)


def test_incompatible_or_missing_index_says_so(db, model, shapes_small_dir, tmp_path):
  with pytest.raises(search.SearchError, match='No search index at'):
    search.query(str(tmp_path / 'missing.db'), text='a red circle', model=model)
  with pytest.raises(search.SearchError, match='ending in .db'):
    search.query(str(tmp_path / 'index.sqlite'), text='a red circle', model=model)
  narrow = search.SearchModel(random_workdir(str(tmp_path / 'narrow'), shapes_small_dir,
                                             embed_dim=16))
  with pytest.raises(search.SearchError,
                     match='holds 32-d embeddings but the model of .* embeds 16-d'):
    search.query(db, text='a red circle', collection='shapes_test', model=narrow)
  other = search.SearchModel(random_workdir(str(tmp_path / 'other'), shapes_small_dir, seed=1))
  with pytest.raises(search.SearchError, match='another model .* weights differ'):
    search.query(db, text='a red circle', collection='shapes_test', model=other)
  with pytest.raises(search.SearchError, match='NAME:SPLIT'):
    search.parse_data('shapes')
  with pytest.raises(search.SearchError, match=r"Cannot index 'coco'.*\['shapes'\]"):
    search.parse_data('coco:test')
  with pytest.raises(search.SearchError, match='Unknown split'):
    search.build_index(model, str(tmp_path / 'x.db'), 'shapes:nope')


def test_a_folder_indexes_with_its_files_and_labels(model, tmp_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  rng = np.random.default_rng(0)
  rows = ['image,caption,label,split']
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(folder / f'p{i}.png')
    label = 'cat' if i % 2 else ''
    rows.append(f'p{i}.png,a photo number {i},{label},test')
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(folder / 'train.png')
  rows.append('train.png,a photo for training,cat,train')
  (folder / 'captions.csv').write_text('\n'.join(rows) + '\n')
  assert search.parse_data(f'{folder}:test') == ('image_text_folder', 'test', str(folder))
  db = str(tmp_path / 'folder.db')
  stats = search.build_index(model, db, f'{folder}:test', collection='photos',
                             data_dir=str(tmp_path / 'tfds'))
  assert (stats['images'], stats['captions']) == (6, 6)
  hits = search.query(db, image=str(folder / 'p3.png'), k=6, collection='photos', model=model)
  by_file = {os.path.basename(h['image']): h for h in hits}
  assert set(by_file) == {f'p{i}.png' for i in range(6)}
  assert by_file['p3.png']['label'] == 'cat' and by_file['p2.png']['label'] is None
  assert hits[0]['image'] == str(folder / 'p3.png')


def test_query_images_of_any_size_and_mode(db, model, shapes_small_cfg, tmp_path):
  pixels = datasets.data_source(shapes_small_cfg, 'test')[5]['image']
  rgba = tmp_path / 'rgba.png'
  Image.fromarray(pixels).convert('RGBA').save(rgba)
  top = search.query(db, image=str(rgba), k=3, collection='shapes_test', model=model)
  assert top[0]['id'] == 5 and top[0]['score'] == pytest.approx(1.0, abs=1e-5)
  large_gray = tmp_path / 'gray16.png'
  Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 13 % 65536).astype(np.uint16)).save(
      large_gray)
  assert len(search.query(db, image=str(large_gray), k=4, collection='shapes_test',
                          model=model)) == 4
  fake = tmp_path / 'text.png'
  fake.write_text('not an image')
  with pytest.raises(search.SearchError, match='Cannot read image'):
    search.query(db, image=str(fake), collection='shapes_test', model=model)


def test_image_pixels_converts_modes_and_sizes():
  wide = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
  out = generation.image_pixels(Image.fromarray(wide), 4)
  expected = np.rint(wide.astype(np.float64) * 255 / 65535)  # scaled, not clipped to white
  np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))
  rgb = np.random.RandomState(0).randint(0, 256, (6, 6, 3)).astype(np.uint8)
  opaque = Image.fromarray(rgb).convert('RGBA')
  np.testing.assert_array_equal(generation.image_pixels(opaque, 6), rgb)
  wide_image = Image.fromarray(np.zeros((6, 12, 3), np.uint8))
  for resize in ('squash', 'crop'):
    assert generation.image_pixels(wide_image, 3, resize).shape == (3, 3, 3)


def test_missing_pymilvus_names_the_install_command(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'pymilvus', None)  # makes `import pymilvus` fail
  with pytest.raises(search.SearchError, match=r"pip install 'vlm_jax\[search\]'"):
    search.open_client(str(tmp_path / 'index.db'), create=True)


@pytest.mark.slow
def test_command_line(workdir, shapes_small_dir, tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, '-m', 'vlm_jax.search', *args], cwd=REPO,
                          env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True,
                          timeout=300)

  db_path = str(tmp_path / 'cli.db')
  result = run('index', f'--workdir={workdir}', '--data=shapes:test', f'--db={db_path}',
               '--max_examples=24', '--collection=small')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Indexed 24 images and 120 captions (32-d) of shapes:test" in result.stdout
  result = run('query', f'--db={db_path}', '--text=a red circle', '--k=5', '--json')
  assert result.returncode == 0, result.stderr[-3000:]
  hits = json.loads(result.stdout)
  assert len(hits) == 5 and all(set(h) == {'id', 'score', 'caption', 'label', 'image'}
                                for h in hits)
  assert all(isinstance(h['id'], int) and isinstance(h['score'], float) for h in hits)
  assert [h['score'] for h in hits] == sorted((h['score'] for h in hits), reverse=True)
  result = run('query', f'--db={db_path}', '--text=a red circle', '--k=2', '--target=captions')
  assert result.returncode == 0 and len(result.stdout.splitlines()) == 3  # header + 2 rows
  result = run('export', f'--db={db_path}', f'--out={tmp_path}/out')
  assert result.returncode == 0, result.stderr[-3000:]
  assert np.load(tmp_path / 'out' / 'small_captions.npy').shape == (120, 32)
  for args, message in ((['query', f'--db={tmp_path}/none.db', '--text=x'], 'No search index'),
                        (['query', f'--db={db_path}'], 'exactly one of --text and --image'),
                        (['find', f'--db={db_path}'], 'Give one command: index | query'),
                        (['index', f'--db={db_path}', f'--workdir={workdir}'], '--data')):
    result = run(*args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr
