"""Runs the configured evaluators of `config.eval` on a model and returns flat metrics,
named `eval/<split>/<metric>` as DESIGN.md fixes them.

Every process evaluates the whole split and gets the same metrics (process 0 writes them).
When the parameters are global arrays on a mesh (as the trainer's are, across processes in a
multi-process run), each evaluation batch becomes a global array split over the mesh's batch
axes, and the embeddings come back all-gathered (fully replicated), so that every process can
read them.
"""
import json
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.data import datasets
from vlm_jax.data import image_text_folder
from vlm_jax.data import pipeline
from vlm_jax.data import records
from vlm_jax.eval import captioning
from vlm_jax.eval import matching
from vlm_jax.eval import retrieval
from vlm_jax.eval import zeroshot
from vlm_jax.inference import generation
from vlm_jax.training import cpu_backend, partitioning

TEMPLATES_FILE = 'prompt_templates.json'  # in the workdir: the zero-shot templates used
_CAPTION_TEMPLATES: dict[str, list[str]] = {}  # build directory -> templates from its captions


def batched(fn: Callable[..., Any], batch_size: int, *arrays: np.ndarray) -> np.ndarray:
  """Applies `fn` to fixed-size batches (the last one padded, so one compilation serves all)
  and concatenates the results: [N, ...] -> [N, E]."""
  n = len(arrays[0])
  outputs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    valid = len(chunk[0])
    if valid < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - valid, axis=0)]) for c in chunk]
    outputs.append(np.asarray(fn(*chunk))[:valid])
  return np.concatenate(outputs) if outputs else np.zeros((0,))


def params_mesh(params: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first parameter placed with a NamedSharding, or None."""
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding):
      return leaf.sharding.mesh
  return None


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


class Placement:
  """Puts host batches onto a mesh, split over its batch axes; outputs come back replicated.

  Every process holds the same host batch; `make_array_from_callback` takes from it the rows
  of this process's devices, so the call is the same in one process or many.
  """

  def __init__(self, mesh: jax.sharding.Mesh, parallel_cfg: ml_collections.ConfigDict):
    self.batch = partitioning.batch_sharding(mesh, parallel_cfg)
    self.replicated = NamedSharding(mesh, P())
    self.num_shards = mesh.size // self.batch.shard_shape((mesh.size,))[0]  # of the batch rows

  def put(self, x: np.ndarray) -> jax.Array:
    """Host [B, ...] (the same on every process) -> global [B, ...] split over the batch axes."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.batch, lambda index: x[index])


class Embedder:
  """Jitted image and text embedding functions of a dual-encoder-like model.

  `params` may be host arrays, arrays on one device, or global arrays on a mesh (then pass
  `parallel_cfg`, the `parallel` config group, to split batches the trainer's way).
  """

  def __init__(self, model: nn.Module, params: Any, tokenizer, max_len: int, batch_size: int,
               parallel_cfg: ml_collections.ConfigDict | None = None):
    self.tokenizer, self.max_len = tokenizer, max_len
    self._params = params
    apply = lambda method: lambda p, *xs: model.apply({'params': p}, *xs, method=method)
    mesh = params_mesh(params) if parallel_cfg is not None else None
    if mesh is None:
      put, jit = jax.device_put, jax.jit
    else:
      placement = Placement(mesh, parallel_cfg)
      batch_size = _round_up(batch_size, placement.num_shards)
      put = placement.put
      jit = lambda fn: jax.jit(fn, out_shardings=placement.replicated)
    self._put = lambda x: cpu_backend.ready(put(x))  # as the trainer's batches
    self._image, self._text = jit(apply(model.encode_image)), jit(apply(model.encode_text))
    # A fusion model's tower tokens and ITM match scores (see FusionEncoder).
    self.can_match = hasattr(model, 'match_score')
    if self.can_match:
      self._image_tokens = jit(apply(lambda m, x: m.image_features(x)[1]))
      self._text_tokens = jit(apply(lambda m, i, k: m.text_features(i, k)[1]))
      self._match = jit(apply(model.match_score))
    self.batch_size = batch_size

  def _image_batch(self, images: np.ndarray) -> jax.Array:
    return self._image(self._params, self._put(images))

  def _text_batch(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    return self._text(self._params, self._put(ids), self._put(mask))

  def images(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] normalised float32 -> [N, E]."""
    return batched(self._image_batch, self.batch_size, images)

  def token_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return batched(self._text_batch, self.batch_size, ids, mask)

  def tokenize(self, texts):
    return self.tokenizer.encode_batch(list(texts), self.max_len)

  def texts(self, texts) -> np.ndarray:
    """list of N strings -> [N, E]."""
    return self.token_ids(*self.tokenize(texts))

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """Fusion models: [N, H, W, 3] -> the image tower's tokens [N, T, Di]."""
    fn = lambda x: self._image_tokens(self._params, self._put(x))
    return batched(fn, self.batch_size, images)

  def text_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fusion models: ids, mask [N, L] -> the text tower's tokens [N, L, Dt]."""
    fn = lambda i, m: self._text_tokens(self._params, self._put(i), self._put(m))
    return batched(fn, self.batch_size, ids, mask)

  def match(self, image_tokens: np.ndarray, text_tokens: np.ndarray,
            text_mask: np.ndarray) -> np.ndarray:
    """Fusion models: the ITM score of each pair of token rows, [N]."""
    fn = lambda i, t, m: self._match(self._params, self._put(i), self._put(t), self._put(m))
    return batched(fn, self.batch_size, image_tokens, text_tokens, text_mask)


def _train_captions(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """Every caption of the built train split (records parsed, images left undecoded)."""
  if data_cfg.train_split not in datasets.split_names(data_cfg):
    return []
  source = datasets.data_source(data_cfg, data_cfg.train_split, raw=True)
  captions: list[str] = []
  for start in range(0, len(source), 1024):
    chunk = source.__getitems__(range(start, min(start + 1024, len(source))))
    for features in records.parse_each(chunk):
      captions.extend(records.texts(features, 'captions'))
  return captions


def _caption_templates(data_cfg: ml_collections.ConfigDict, class_names: list[str]
                       ) -> list[str]:
  """`zeroshot.templates_from_captions` of the train captions, once per build."""
  key = os.fspath(datasets.get_builder(data_cfg).data_dir)
  if key not in _CAPTION_TEMPLATES:
    _CAPTION_TEMPLATES[key] = zeroshot.templates_from_captions(
        _train_captions(data_cfg), class_names, zeroshot.MAX_CAPTION_TEMPLATES)
  return _CAPTION_TEMPLATES[key]


def prompt_templates(config: ml_collections.ConfigDict, class_names: list[str]
                     ) -> tuple[list[str], str]:
  """The zero-shot templates and where they come from: `eval.prompt_templates` when set
  ('config'); else, for an image_text_folder, its train captions that name a class
  ('captions'); else `zeroshot.PHOTO_TEMPLATES` ('photo')."""
  if config.eval.prompt_templates:
    return list(config.eval.prompt_templates), 'config'
  if config.data.name == image_text_folder.NAME:
    templates = _caption_templates(config.data, class_names)
    if templates:
      return templates, 'captions'
  return list(zeroshot.PHOTO_TEMPLATES), 'photo'


def record_prompt_templates(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Logs the zero-shot templates of `prompt_templates` and writes them, with their source,
  to `workdir`/TEMPLATES_FILE (process 0); nothing when zero-shot is off or the data has no
  class labels."""
  class_names = datasets.class_names(config.data)
  if not (config.eval.zeroshot and class_names):
    return
  templates, source = prompt_templates(config, class_names)
  logging.info('Zero-shot prompt templates (from %s): %s', source, templates)
  if workdir and jax.process_index() == 0:
    with open(os.path.join(workdir, TEMPLATES_FILE), 'w') as f:
      json.dump({'source': source, 'templates': templates}, f, indent=2)


def evaluate_split(config: ml_collections.ConfigDict, embedder: Embedder | None, split: str,
                   class_names: list[str], generator: Any = None) -> dict[str, float]:
  """Zero-shot classification (single-object images) and retrieval on one split; with a
  captioner's `generator` (`vlm_jax.inference.generation.Generator`), captioning and VQA.
  `embedder` is None for models without contrastive embeddings (zero-shot, retrieval and
  matching are then off)."""
  examples = pipeline.eval_examples(config.data, split, config.eval.max_examples)
  image_emb = None if embedder is None else embedder.images(examples['image'])
  metrics: dict[str, float] = {}
  text_emb = None  # of all captions, shared by retrieval and ITM re-ranking
  if config.eval.zeroshot and class_names:
    # Images whose label names their only object (shapes); labelled images (image_text_folder).
    single = (np.asarray(examples['num_objects']) == 1) & (np.asarray(examples['label']) >= 0)
    if single.any():
      templates, _ = prompt_templates(config, class_names)
      class_emb = zeroshot.class_text_embeddings(
          embedder.token_ids, embedder.tokenize, class_names, templates)
      metrics.update(zeroshot.zeroshot_metrics(
          image_emb[single], np.asarray(examples['label'])[single], class_emb))
  if config.eval.retrieval:
    captions = [c for caps in examples['captions'] for c in caps]
    text_to_image = np.asarray([i for i, caps in enumerate(examples['captions']) for _ in caps])
    text_emb = embedder.texts(captions)
    metrics.update(retrieval.retrieval_metrics(image_emb, text_emb, text_to_image))
  if config.eval.matching:
    metrics.update(_matching_metrics(config, embedder, examples, image_emb, text_emb))
  if generator is not None:
    metrics.update(captioning.evaluate_examples(config.eval, generator, examples))
  return {f'eval/{split}/{k}': float(v) for k, v in metrics.items()}


def _matching_metrics(config: ml_collections.ConfigDict, embedder: Embedder, examples: dict,
                      image_emb: np.ndarray, text_emb: np.ndarray | None) -> dict[str, float]:
  """Relation, attribute and position swap accuracy (by cosine, and by ITM for fusion
  models; position also for one- and two-object scenes apart); for fusion models also ITM
  accuracy and retrieval re-ranked by ITM. `text_emb`: the captions' embeddings when
  retrieval already computed them (else None)."""
  metrics = {}
  fusion = embedder.can_match
  if fusion:
    image_tokens = embedder.image_tokens(examples['image'])

    def itm(rows, texts):
      ids, mask = embedder.tokenize(texts)
      return embedder.match(image_tokens[rows], embedder.text_tokens(ids, mask), mask)

  for kind, (rows, trues, falses) in matching.swap_negatives(examples).items():
    if not len(rows):
      continue
    cosine = lambda texts: np.sum(image_emb[rows] * embedder.texts(texts), axis=-1)
    prefix = 'itc_' if fusion else ''
    scores = {f'{prefix}{kind}': (cosine(trues), cosine(falses))}
    if fusion:
      scores[kind] = (itm(rows, trues), itm(rows, falses))
    for name, (true_scores, false_scores) in scores.items():
      metrics[f'{name}_accuracy'] = matching.pair_accuracy(true_scores, false_scores)
      if kind == 'position':  # grounding (one object) apart from binding (two)
        objects = np.asarray(examples['num_objects'])[rows]
        for count, word in ((1, 'one_object'), (2, 'two_objects')):
          if (objects == count).any():
            metrics[f'{name}_accuracy_{word}'] = matching.pair_accuracy(
                true_scores[objects == count], false_scores[objects == count])
  if not fusion:
    return metrics
  n = len(examples['image'])
  rows = np.arange(n)
  trues = [caps[0] for caps in examples['captions']]
  # Negatives: the canonical caption of the next image with a different one.
  others = [next((trues[(i + s) % n] for s in range(1, n) if trues[(i + s) % n] != trues[i]),
                 trues[i]) for i in range(n)]
  metrics['itm_accuracy'] = matching.itm_accuracy(itm(rows, trues), itm(rows, others))
  k = config.eval.rerank_k
  if k > 0:
    captions = [c for caps in examples['captions'] for c in caps]
    text_to_image = np.asarray([i for i, caps in enumerate(examples['captions']) for _ in caps])
    ids, mask = embedder.tokenize(captions)
    text_tokens = embedder.text_tokens(ids, mask)
    if text_emb is None:
      text_emb = embedder.token_ids(ids, mask)
    sims = image_emb @ text_emb.T  # [N, M]
    captions_of = [np.flatnonzero(text_to_image == i) for i in range(n)]
    i2t = matching.rerank_ranks(
        sims, lambda q: captions_of[q], k,
        lambda q, c: embedder.match(image_tokens[q], text_tokens[c], mask[c]))
    t2i = matching.rerank_ranks(
        sims.T, lambda q: [text_to_image[q]], k,
        lambda q, c: embedder.match(image_tokens[c], text_tokens[q], mask[q]))
    for cut, value in matching.recall_at(i2t, (1, 5, 10)).items():
      metrics[f'i2t_rerank_recall@{cut}'] = value
    for cut, value in matching.recall_at(t2i, (1, 5, 10)).items():
      metrics[f't2i_rerank_recall@{cut}'] = value
  return metrics


def evaluate(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
             tokenizer) -> dict[str, float]:
  """All evaluators of `config.eval` on every split of `config.eval.splits`."""
  embedder = None
  if hasattr(model, 'encode_image'):
    embedder = Embedder(model, params, tokenizer, config.data.max_text_len,
                        config.eval.batch_size, config.parallel)
  else:
    asked = [k for k in ('zeroshot', 'retrieval', 'matching') if config.eval[k]]
    if asked:
      raise ValueError(f'{type(model).__name__} has no contrastive embeddings for eval '
                       f'{", ".join(asked)}: set eval.{asked[0]}=False.')
  class_names = datasets.class_names(config.data)
  if config.eval.zeroshot and not class_names:
    logging.info('Zero-shot evaluation skipped: dataset %s has no class labels (an '
                 'image_text_folder gets them from a label column).', config.data.name)
  generator = None
  if generation.is_captioner(model) and (config.eval.captioning or config.eval.vqa):
    generator = generation.Generator(model, params, tokenizer,
                                     generation.generation_max_len(config),
                                     config.eval.batch_size, config.parallel)
  results: dict[str, float] = {}
  for split in config.eval.splits:
    split_metrics = evaluate_split(config, embedder, split, class_names, generator)
    logging.info('%s', ' '.join(f'{k}={v:.4f}' for k, v in split_metrics.items()))
    results.update(split_metrics)
  return results
