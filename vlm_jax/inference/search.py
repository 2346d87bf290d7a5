"""Multimodal search: a trained model's image and caption embeddings in Milvus Lite.

An index lives in a Milvus Lite database (`pymilvus.MilvusClient(PATH)`, PATH ending in .db:
a directory that Milvus Lite creates). Indexing a dataset split as NAME writes two
collections:

  NAME           one row per image: id (its index in the split), vector [E], image (where
                 to find it: `shapes/32px:test[17]`, or a file path), caption (the first),
                 captions (all), label ('' when none)
  NAME_captions  one row per caption: id, vector [E], image_id, image, caption, label

Vectors are L2-normalised embeddings, searched by inner product (= cosine similarity) with
a FLAT (exact) index. Each collection carries, as its `vlm_jax.search` property, the
embedding size, the dataset and the model's identity (workdir, a fingerprint of its model
and preprocessing config, a digest of its weights), so that a query embedded by another
model is refused in one line instead of returning meaningless neighbours. Re-indexing
replaces both collections (built under temporary names, then renamed): never duplicates,
never a half-written index.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from vlm_jax import config_utils
from vlm_jax.convert import workdir as workdir_lib
from vlm_jax.data import datasets
from vlm_jax.data import image_convert
from vlm_jax.data import image_text_folder
from vlm_jax.data import pipeline
from vlm_jax.defaults import base_config
from vlm_jax.eval import retrieval
from vlm_jax.eval import runner
from vlm_jax.inference import generation

META_KEY = 'vlm_jax.search'
FORMAT = 1
CAPTIONS_SUFFIX = '_captions'
TARGETS = ('images', 'captions')
INSTALL = "pip install 'vlm_jax[search]'  (or: pip install pymilvus milvus-lite)"
_TMP_SUFFIX = '__building'
_MAX_CHARS = 16_383  # a Milvus VARCHAR holds 65,535 bytes: 4 per character at worst
_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,200}$')
_TFDS_REF = re.compile(r'^(\w+)/(\w+):(\w+)\[(\d+)\]$')


class SearchError(ValueError):
  """A search index or query that cannot be used; the message says why and what to do."""


@dataclasses.dataclass
class Item:
  """One image to index: uint8 pixels [H, W, 3], its captions, label name ('' = none) and a
  reference to the image (`shapes/32px:test[17]`, or a file path)."""
  pixels: np.ndarray
  captions: list[str]
  label: str
  image: str


# --------------------------------------------------------------------------- the model


class SearchModel:
  """A workdir's model as two embedding functions (L2-normalised, float32) and its identity.

  Attributes:
    workdir, config: the workdir and its (LoRA-merged) config.
    identity: {'workdir', 'model', 'fingerprint', 'weights'} (see `model_identity`).
    image_size: the side of the model's input images.
  """

  def __init__(self, workdir: str, batch_size: int = 0):
    if not os.path.isdir(workdir):
      raise SearchError(f'No workdir at {workdir!r}.')
    try:
      config, params, tokenizer = workdir_lib.load(workdir)
    except workdir_lib.WorkdirError as e:
      raise SearchError(str(e)) from None
    if tokenizer is None:
      raise SearchError(f'{workdir} has no tokenizer (tokenizer.json, or the one of its '
                        'dataset in data.data_dir): search embeds text with it.')
    from vlm_jax import models  # pylint: disable=g-import-not-at-top
    from vlm_jax.training import trainer  # pylint: disable=g-import-not-at-top
    trainer.resolve_config(config, tokenizer)
    model = models.build_model(config.model, text_max_len=config.data.max_text_len)
    if not (hasattr(model, 'encode_image') and hasattr(model, 'encode_text')):
      raise SearchError(f'{workdir} holds a {config.model.name!r} model, which does not embed '
                        'both images and texts; search needs e.g. a dual_encoder (CLIP, '
                        'SigLIP), fusion_encoder or coca.')
    self.workdir, self.config = workdir, config
    self.image_size = int(config.data.image_size)
    self.identity = model_identity(workdir, config, params)
    images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), np.float32)
    encode = functools.partial(model.apply, method=model.encode_image)
    shape = jax.eval_shape(encode, {'params': params}, images).shape  # no compilation
    if len(shape) != 2:
      raise SearchError(f'The {config.model.name!r} model of {workdir} gives image embeddings '
                        f'of shape {shape[1:]} per image; search needs one vector each.')
    self.embed_dim = shape[1]
    self._embedder = runner.Embedder(model, jax.device_put(params), tokenizer,
                                     config.data.max_text_len,
                                     batch_size or config.eval.batch_size)

  def images(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] at the model's image size -> [N, E] unit-norm float32."""
    emb = self._embedder.images(pipeline.normalize_images(pixels, self.config.data))
    return np.asarray(retrieval.l2_normalize(emb), np.float32)

  def texts(self, texts: Sequence[str]) -> np.ndarray:
    """N strings -> [N, E] unit-norm float32."""
    return np.asarray(retrieval.l2_normalize(self._embedder.texts(texts)), np.float32)


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def model_identity(workdir: str, config: ml_collections.ConfigDict, params: Any) -> dict:
  """What makes two embeddings comparable: `fingerprint` hashes how the model config and the
  preprocessing (image size, mean, std, text length) differ from the defaults (so that keys
  added to the defaults later keep it); `weights` hashes every parameter (names, shapes,
  dtypes, values), so a run trained further is another model."""
  describe = lambda c: {'model': c.model.to_dict(), 'data': {
      k: c.data[k] for k in ('image_size', 'mean', 'std', 'max_text_len')}}
  changes = config_utils.diff(describe(base_config()), describe(config))
  fingerprint = _digest('\n'.join(changes).encode())
  weights = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    weights.update(f'{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}'.encode())
    weights.update(np.ascontiguousarray(leaf).tobytes())
  return {'workdir': os.path.abspath(workdir), 'model': config.model.name,
          'fingerprint': fingerprint, 'weights': weights.hexdigest()[:16]}


# --------------------------------------------------------------------------- datasets


FOLDER = 'image_text_folder'


def parse_data(spec: str) -> tuple[str, str, str]:
  """'NAME:SPLIT' or 'PATH:SPLIT' -> (NAME, SPLIT, PATH).

  PATH is an image-text folder, a WebDataset shard or a directory / pattern of shards (see
  `vlm_jax.data.image_text_folder`); its NAME is 'image_text_folder'. PATH is '' for named
  datasets.
  """
  name, sep, split = spec.rpartition(':')
  if not sep or not name or not split or not re.fullmatch(r'\w+', split):
    raise SearchError(f'--data must be NAME:SPLIT or FOLDER:SPLIT (a dataset or an image-text '
                      f'folder, and a whole split, e.g. shapes:test), got {spec!r}; accepted '
                      f'names: {sorted(set(READERS) - {FOLDER})}.')
  if name in READERS and name != FOLDER:
    return name, split, ''
  if os.path.exists(os.path.expanduser(name)) or any(c in name for c in '{*?'):
    return FOLDER, split, name
  raise SearchError(f'Cannot index {name!r}: neither a dataset name (accepted: '
                    f'{sorted(set(READERS) - {FOLDER})}) nor an existing folder or shard path.')


def data_config(model_config: ml_collections.ConfigDict, name: str,
                data_dir: str = '', path: str = '') -> ml_collections.ConfigDict:
  """The `data` group to read dataset `name` with: the workdir's own when it trained on
  `name`, else that dataset's defaults; `data_dir` overrides where it is built and `path`
  names the folder of an image-text folder dataset."""
  if model_config.data.name == name:
    cfg = ml_collections.ConfigDict(model_config.data.to_dict())
  else:
    cfg = base_config().data
    cfg.name = name
  if data_dir:
    cfg.data_dir = data_dir
  if path:
    cfg.path = path
  return cfg


def _tfds_ref(data_cfg: ml_collections.ConfigDict, split: str, index: int) -> str:
  return f'{data_cfg.name}/{data_cfg.builder_config}:{split}[{index}]'


def _tfds_items(data_cfg: ml_collections.ConfigDict, split: str, max_examples: int,
                chunk: int) -> Iterator[list[Item]]:
  """Chunks of a tensorflow-datasets split with an `image`, `captions` (or `caption`) and
  optionally a ClassLabel `label` feature (-1: unlabelled). The image reference is the
  file of a folder dataset's `image_id`, else the split and index."""
  try:
    source = datasets.built_source(data_cfg, split)
  except (OSError, ValueError) as e:
    raise SearchError(str(e)) from None
  features = datasets.get_builder(data_cfg).info.features
  names = features['label'].names if 'label' in features else None
  n = len(source) if max_examples <= 0 else min(max_examples, len(source))
  for start in range(0, n, chunk):
    items = []
    for i in range(start, min(start + chunk, n)):
      ex = source[i]
      captions = ex['captions'] if 'captions' in ex else [ex['caption']]
      label = int(ex['label']) if names else -1
      file = (image_text_folder.image_path(data_cfg, ex['image_id'].decode('utf-8'))
              if 'image_id' in ex else None)
      items.append(Item(pixels=ex['image'], captions=[c.decode('utf-8') for c in captions],
                        label=names[label] if label >= 0 else '',
                        image=file or _tfds_ref(data_cfg, split, i)))
    yield items


# NAME of --data=NAME:SPLIT -> reader(data_cfg, split, max_examples, chunk) -> Item chunks.
READERS: dict[str, Callable[..., Iterator[list[Item]]]] = {'shapes': _tfds_items,
                                                           FOLDER: _tfds_items}


def image_of(ref: str, data_dir: str = '') -> np.ndarray:
  """The uint8 pixels [H, W, 3] of a hit's `image` reference (a file, or `NAME/CONFIG:SPLIT[i]`
  of a tensorflow-datasets dataset built in `data_dir`)."""
  match = _TFDS_REF.match(ref)
  if match is None:
    with Image.open(ref) as img:
      return np.asarray(image_convert.to_rgb(img))
  name, builder_config, split, index = match.groups()
  cfg = base_config().data
  cfg.name, cfg.builder_config, cfg.data_dir = name, builder_config, data_dir
  return datasets.data_source(cfg, split)[int(index)]['image']


# --------------------------------------------------------------------------- the index


class _UnimplementedRpc(logging.Filter):
  """Drops the tracebacks that Milvus Lite's in-process gRPC server logs when pymilvus probes
  for an RPC it lacks (pymilvus then falls back by itself)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


def _pymilvus():
  try:
    import pymilvus  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SearchError(f'Search needs pymilvus and milvus-lite, which are not installed: '
                      f'{INSTALL}') from None
  for name in ('pymilvus', 'milvus_lite'):  # our errors say it in one line
    logging.getLogger(name).setLevel(logging.CRITICAL)
  grpc_server = logging.getLogger('grpc._server')
  if not any(isinstance(f, _UnimplementedRpc) for f in grpc_server.filters):
    grpc_server.addFilter(_UnimplementedRpc())
  return pymilvus


def _check_db(db: str) -> None:
  if not db.endswith('.db'):
    raise SearchError(f'--db must be a Milvus Lite database path ending in .db, got {db!r}.')


def open_client(db: str, create: bool = False):
  """A `pymilvus.MilvusClient` on the database `db`; unless `create`, it must exist."""
  _check_db(db)
  if not create and not os.path.exists(db):
    raise SearchError(f'No search index at {db!r}; build one with python -m vlm_jax.search '
                      f'index --workdir=RUN --data=shapes:test --db={db}')
  pymilvus = _pymilvus()
  os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
  try:
    return pymilvus.MilvusClient(os.path.abspath(db))
  except pymilvus.MilvusException as e:
    raise SearchError(f'Cannot open the index {db!r} ({e.message}): Milvus Lite lets one '
                      'process at a time open a database; close the other one using it (e.g. '
                      'a notebook\'s client).') from None


def collection_meta(client, collection: str) -> dict | None:
  """The `vlm_jax.search` description of a collection, or None (absent, or not ours)."""
  if not client.has_collection(collection):
    return None
  value = client.describe_collection(collection).get('properties', {}).get(META_KEY)
  return json.loads(value) if value else None


def image_collections(client) -> list[str]:
  """The image collections of indexes that `index` wrote, sorted."""
  return sorted(c for c in client.list_collections()
                if not c.endswith(_TMP_SUFFIX)
                and (collection_meta(client, c) or {}).get('kind') == 'images')


def resolve_collection(client, db: str, collection: str) -> str:
  """`collection` if it is an index in `db`; with '' the only index there."""
  names = image_collections(client)
  if collection:
    if collection not in names:
      raise SearchError(f'{db} has no index {collection!r}; it has: '
                        f'{", ".join(names) or "none"}.')
    return collection
  if not names:
    raise SearchError(f'{db} holds no search index; build one with python -m vlm_jax.search '
                      f'index --workdir=RUN --data=shapes:test --db={db}')
  if len(names) > 1:
    raise SearchError(f'{db} holds several indexes ({", ".join(names)}); choose one with '
                      '--collection.')
  return names[0]


def _create(client, name: str, dim: int, kind: str) -> None:
  pymilvus = _pymilvus()
  varchar = lambda: dict(datatype=pymilvus.DataType.VARCHAR, max_length=65_535)
  schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
  schema.add_field('id', pymilvus.DataType.INT64, is_primary=True)
  schema.add_field('vector', pymilvus.DataType.FLOAT_VECTOR, dim=dim)
  for field in ('image', 'caption', 'label'):
    schema.add_field(field, **varchar())
  if kind == 'images':
    schema.add_field('captions', pymilvus.DataType.JSON)
  else:
    schema.add_field('image_id', pymilvus.DataType.INT64)
  index = client.prepare_index_params()
  index.add_index('vector', index_type='FLAT', metric_type='IP')
  if client.has_collection(name):
    client.drop_collection(name)
  client.create_collection(name, schema=schema, index_params=index)


def _clip(text: str) -> str:
  return text[:_MAX_CHARS]


def _image_rows(items: list[Item], ids: range, emb: np.ndarray) -> list[dict]:
  return [{'id': i, 'vector': v.tolist(), 'image': _clip(it.image),
           'caption': _clip(it.captions[0] if it.captions else ''), 'label': _clip(it.label),
           'captions': [_clip(c) for c in it.captions]}
          for i, it, v in zip(ids, items, emb)]


def _caption_rows(items: list[Item], ids: range, first_id: int, emb: np.ndarray
                  ) -> list[dict]:
  owners = [(i, it) for i, it in zip(ids, items) for _ in it.captions]
  captions = [c for it in items for c in it.captions]
  return [{'id': first_id + j, 'vector': v.tolist(), 'image_id': i, 'image': _clip(it.image),
           'caption': _clip(c), 'label': _clip(it.label)}
          for j, ((i, it), c, v) in enumerate(zip(owners, captions, emb))]


def _model_pixels(items: list[Item], model: SearchModel) -> np.ndarray:
  """uint8 [N, S, S, 3]: the items' pixels, converted and resized where needed."""
  size = model.image_size
  return np.stack([it.pixels if it.pixels.shape == (size, size, 3) and
                   it.pixels.dtype == np.uint8 else
                   generation.image_pixels(Image.fromarray(it.pixels), size,
                                           model.config.data.resize)
                   for it in items])


def build_index(model: SearchModel, db: str, data: str, collection: str = '',
                data_dir: str = '', max_examples: int = 0, chunk: int = 1024) -> dict:
  """Embeds the images and captions of `data` ('NAME:SPLIT') into collections `collection`
  (default NAME_SPLIT) and `collection`_captions of `db`, replacing earlier ones.

  Returns:
    {'collection', 'images', 'captions', 'embed_dim', 'embed_s', 'insert_s', 'total_s'}.
  """
  start = time.perf_counter()
  name, split, path = parse_data(data)
  collection = collection or f'{name}_{split}'
  if not _NAME.match(collection) or collection.endswith(_TMP_SUFFIX):
    raise SearchError(f'--collection must be letters, digits and underscores, starting with a '
                      f'letter or underscore (and not ending in {_TMP_SUFFIX}), got '
                      f'{collection!r}.')
  data_cfg = data_config(model.config, name, data_dir, path)
  client = open_client(db, create=True)
  names = {'images': collection, 'captions': collection + CAPTIONS_SUFFIX}
  counts = {'images': 0, 'captions': 0}
  dim, embed_s, insert_s = None, 0.0, 0.0
  try:
    for items in READERS[name](data_cfg, split, max_examples, chunk):
      t = time.perf_counter()
      image_emb = model.images(_model_pixels(items, model))
      text_emb = model.texts([c for it in items for c in it.captions])
      embed_s += time.perf_counter() - t
      t = time.perf_counter()
      if dim is None:
        dim = image_emb.shape[1]
        for kind, target in names.items():
          _create(client, target + _TMP_SUFFIX, dim, kind)
      ids = range(counts['images'], counts['images'] + len(items))
      client.insert(names['images'] + _TMP_SUFFIX, _image_rows(items, ids, image_emb))
      if len(text_emb):
        client.insert(names['captions'] + _TMP_SUFFIX,
                      _caption_rows(items, ids, counts['captions'], text_emb))
      counts['images'] += len(items)
      counts['captions'] += len(text_emb)
      insert_s += time.perf_counter() - t
      logging.info('Indexed %d images, %d captions', counts['images'], counts['captions'])
    if dim is None:
      raise SearchError(f'{data} has no examples to index.')
    for kind, target in names.items():
      meta = {'format': FORMAT, 'kind': kind, 'count': counts[kind], 'embed_dim': dim,
              'data': {'spec': data, 'name': data_cfg.name, 'split': split,
                       'builder_config': data_cfg.builder_config,
                       'data_dir': data_cfg.data_dir},
              'model': model.identity, 'pair': names['captions' if kind == 'images'
                                                     else 'images']}
      client.alter_collection_properties(target + _TMP_SUFFIX,
                                         properties={META_KEY: json.dumps(meta)})
    for target in names.values():
      if client.has_collection(target):
        client.drop_collection(target)
      client.rename_collection(target + _TMP_SUFFIX, target)
  finally:
    client.close()
  return {'collection': collection, 'images': counts['images'],
          'captions': counts['captions'], 'embed_dim': dim, 'embed_s': embed_s,
          'insert_s': insert_s, 'total_s': time.perf_counter() - start}


def check_compatible(meta: dict, collection: str, model: SearchModel) -> None:
  """Raises SearchError unless `model` embeds like the model that built the index."""
  built = meta['model']
  if model.embed_dim != meta['embed_dim']:
    raise SearchError(f'Index {collection!r} holds {meta["embed_dim"]}-d embeddings but the '
                      f'model of {model.workdir} embeds {model.embed_dim}-d; query with the '
                      f'workdir that built it ({built["workdir"]}) or re-index.')
  ours = model.identity
  for key, what in (('fingerprint', 'model config or preprocessing'), ('weights', 'weights')):
    if built[key] != ours[key]:
      raise SearchError(f'Index {collection!r} was built by another model than '
                        f'{model.workdir} (its {what} differ: {key} {built[key]} vs '
                        f'{ours[key]}); query with {built["workdir"]} or re-index.')


def _hit(hit: dict, kind: str) -> dict:
  entity = hit['entity']
  out = {'id': int(hit['id']), 'score': float(hit['distance']),
         'caption': entity.get('caption') or None, 'label': entity.get('label') or None,
         'image': entity.get('image') or None}
  if kind == 'captions':
    out['image_id'] = int(entity['image_id'])
  return out


def search_vectors(client, collection: str, vectors: np.ndarray, k: int) -> list[list[dict]]:
  """Top-k hits of each query vector [Q, E] (unit norm) in `collection`, best first: dicts
  with id, score (cosine), caption, label, image (and image_id for caption collections)."""
  meta = collection_meta(client, collection)
  if meta is None:
    raise SearchError(f'No index {collection!r}.')
  if vectors.ndim != 2 or vectors.shape[1] != meta['embed_dim']:
    raise SearchError(f'Index {collection!r} holds {meta["embed_dim"]}-d embeddings; got '
                      f'queries of shape {vectors.shape}.')
  if not 1 <= k <= 16_384:
    raise SearchError(f'k must be between 1 and 16384 (Milvus top-k limit), got {k}.')
  fields = ['image', 'caption', 'label'] + (['image_id'] if meta['kind'] == 'captions' else [])
  client.load_collection(collection)
  results = client.search(collection, data=np.asarray(vectors, np.float32).tolist(), limit=k,
                          output_fields=fields, search_params={'metric_type': 'IP'})
  return [[_hit(h, meta['kind']) for h in hits] for hits in results]


def query(db: str, *, text: str = '', image: str = '', k: int = 10, collection: str = '',
          target: str = 'images', workdir: str = '', model: SearchModel | None = None
          ) -> list[dict]:
  """The top-k images (or captions, `target='captions'`) of index `collection` in `db` for a
  text or an image file, embedded by `model` (default: loaded from `workdir`, or from the
  workdir that built the index)."""
  if bool(text) == bool(image):
    raise SearchError('Give exactly one of --text and --image.')
  if target not in TARGETS:
    raise SearchError(f'--target must be one of {TARGETS}, got {target!r}.')
  if image and not os.path.isfile(image):
    raise SearchError(f'No image file at {image!r}.')
  client = open_client(db)
  try:
    collection = resolve_collection(client, db, collection)
    meta = collection_meta(client, collection)
    if model is None:
      workdir = workdir or meta['model']['workdir']
      if not os.path.isdir(workdir):
        raise SearchError(f'Index {collection!r} was built from {workdir}, which no longer '
                          'exists; pass --workdir=RUN with the same model.')
      model = SearchModel(workdir, batch_size=1)
    check_compatible(meta, collection, model)
    if text:
      vector = model.texts([text])
    else:
      try:
        pixels = generation.load_image(image, model.image_size, model.config.data.resize)
        vector = model.images(pixels[None])
      except ValueError as e:
        raise SearchError(str(e)) from None
    name = collection if target == 'images' else meta['pair']
    return search_vectors(client, name, vector, k)[0]
  finally:
    client.close()


def _all_rows(client, collection: str, fields: list[str]) -> list[dict]:
  client.load_collection(collection)
  iterator = client.query_iterator(collection, batch_size=1000, output_fields=fields)
  rows = []
  while batch := iterator.next():
    rows.extend(batch)
  iterator.close()
  return sorted(rows, key=lambda r: r['id'])


def export(db: str, out: str, collection: str = '') -> dict:
  """Writes `out/NAME.npy` (vectors [N, E], float32) and `out/NAME.jsonl` (one object per
  row, same order) for the index's image and caption collections, and `out/NAME.json` (the
  index's description). Returns {collection name: rows written}."""
  client = open_client(db)
  written = {}
  try:
    collection = resolve_collection(client, db, collection)
    meta = collection_meta(client, collection)
    os.makedirs(out, exist_ok=True)
    for name in (collection, meta['pair']):
      kind = collection_meta(client, name)['kind']
      fields = ['id', 'vector', 'image', 'caption', 'label',
                'captions' if kind == 'images' else 'image_id']
      rows = _all_rows(client, name, fields)
      vectors = np.asarray([r.pop('vector') for r in rows], np.float32).reshape(
          len(rows), meta['embed_dim'])
      np.save(os.path.join(out, f'{name}.npy'), vectors)
      with open(os.path.join(out, f'{name}.jsonl'), 'w') as f:
        for row in rows:
          f.write(json.dumps(row) + '\n')
      written[name] = len(rows)
    with open(os.path.join(out, f'{collection}.json'), 'w') as f:
      json.dump({n: collection_meta(client, n) for n in written}, f, indent=2)
  finally:
    client.close()
  return written
