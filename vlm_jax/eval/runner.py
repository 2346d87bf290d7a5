"""Runs the configured evaluators of `config.eval` on a model and returns flat metrics,
named `eval/<split>/<metric>` as DESIGN.md fixes them."""
import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.eval import retrieval
from vlm_jax.eval import zeroshot


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


class Embedder:
  """Jitted image and text embedding functions of a dual-encoder-like model."""

  def __init__(self, model: nn.Module, params: Any, tokenizer, max_len: int, batch_size: int):
    self.tokenizer, self.max_len, self.batch_size = tokenizer, max_len, batch_size
    self._params = params
    self._image = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_image))
    self._text = jax.jit(
        lambda p, i, m: model.apply({'params': p}, i, m, method=model.encode_text))

  def images(self, images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] normalised float32 -> [N, E]."""
    return batched(functools.partial(self._image, self._params), self.batch_size, images)

  def token_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return batched(functools.partial(self._text, self._params), self.batch_size, ids, mask)

  def tokenize(self, texts):
    return self.tokenizer.encode_batch(list(texts), self.max_len)

  def texts(self, texts) -> np.ndarray:
    """list of N strings -> [N, E]."""
    return self.token_ids(*self.tokenize(texts))


def evaluate_split(config: ml_collections.ConfigDict, embedder: Embedder, split: str,
                   class_names: list[str]) -> dict[str, float]:
  """Zero-shot classification (single-object images) and retrieval on one split."""
  examples = pipeline.eval_examples(config.data, split, config.eval.max_examples)
  image_emb = embedder.images(examples['image'])
  metrics: dict[str, float] = {}
  if config.eval.zeroshot:
    single = np.asarray(examples['num_objects']) == 1
    if single.any():
      class_emb = zeroshot.class_text_embeddings(
          embedder.token_ids, embedder.tokenize, class_names, config.eval.prompt_templates)
      metrics.update(zeroshot.zeroshot_metrics(
          image_emb[single], np.asarray(examples['label'])[single], class_emb))
  if config.eval.retrieval:
    captions = [c for caps in examples['captions'] for c in caps]
    text_to_image = np.asarray([i for i, caps in enumerate(examples['captions']) for _ in caps])
    metrics.update(retrieval.retrieval_metrics(image_emb, embedder.texts(captions), text_to_image))
  return {f'eval/{split}/{k}': float(v) for k, v in metrics.items()}


def evaluate(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
             tokenizer) -> dict[str, float]:
  """All evaluators of `config.eval` on every split of `config.eval.splits`."""
  embedder = Embedder(model, params, tokenizer, config.data.max_text_len, config.eval.batch_size)
  class_names = datasets.class_names(config.data)
  results: dict[str, float] = {}
  for split in config.eval.splits:
    split_metrics = evaluate_split(config, embedder, split, class_names)
    logging.info('%s', ' '.join(f'{k}={v:.4f}' for k, v in split_metrics.items()))
    results.update(split_metrics)
  return results
