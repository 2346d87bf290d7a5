"""Captioning and VQA evaluation of a captioner (CoCa) on one split.

Metrics (the runner prefixes them with `eval/<split>/`):
  cider, bleu4: CIDEr-D and BLEU-4 of the greedy caption of every image against all of its
    reference captions (`vlm_jax.eval.caption_metrics`, pycocoevalcap's definitions).
  caption_object_accuracy: on single-object images, the fraction of captions that name the
    object's colour and shape and no other colour or shape word.
  vqa_accuracy: the greedy answer after `[BOS] question` against the true one-word answer,
    exact match after the VQA normalisation (`vlm_jax.eval.vqa_metrics`), over every
    question of every image; vqa_accuracy_single_object: the same on single-object images.
"""
import re
from typing import Sequence

import ml_collections
import numpy as np

from vlm_jax.data import shapes_scene
from vlm_jax.eval import caption_metrics
from vlm_jax.eval import vqa_metrics
from vlm_jax.inference.generation import Generator

_WORD = re.compile(r'[a-z]+')


def names_object(caption: str, color: str, shape: str,
                 colors: Sequence[str] = tuple(shapes_scene.COLORS),
                 shapes: Sequence[str] = shapes_scene.SHAPES) -> bool:
  """Whether `caption` names `color` and `shape` and no other word of `colors` / `shapes`."""
  words = set(_WORD.findall(caption.lower()))
  return words & set(colors) == {color} and words & set(shapes) == {shape}


def caption_object_accuracy(captions: Sequence[str], objects: Sequence[list[dict]]) -> float:
  """Fraction of single-object examples whose caption `names_object` its object; NaN when
  there is none. `objects`: per example, a list of {'color', 'shape', ...} dicts."""
  hits = [names_object(c, objs[0]['color'], objs[0]['shape'])
          for c, objs in zip(captions, objects) if len(objs) == 1]
  return float(np.mean(hits)) if hits else float('nan')


def caption_scores(generator: Generator, examples: dict) -> dict[str, float]:
  """cider, bleu4, caption_object_accuracy of the greedy captions of `examples`
  (`vlm_jax.data.pipeline.eval_examples`)."""
  captions = generator.captions(examples['image'])
  references = examples['captions']
  return {'cider': caption_metrics.cider_d(captions, references),
          'bleu4': caption_metrics.bleu4(captions, references),
          'caption_object_accuracy': caption_object_accuracy(captions, examples['objects'])}


def vqa_scores(generator: Generator, examples: dict) -> dict[str, float]:
  """vqa_accuracy (every question of every image) and vqa_accuracy_single_object."""
  rows = [i for i, qs in enumerate(examples['questions']) for _ in qs]
  if not rows:
    return {}
  questions = [q for qs in examples['questions'] for q in qs]
  answers = [a for ans in examples['answers'] for a in ans]
  predictions = generator.answers(examples['image'][np.asarray(rows)], questions)
  metrics = {'vqa_accuracy': vqa_metrics.vqa_accuracy(predictions, answers)}
  single = [k for k, i in enumerate(rows) if examples['num_objects'][i] == 1]
  if single:
    metrics['vqa_accuracy_single_object'] = vqa_metrics.vqa_accuracy(
        [predictions[k] for k in single], [answers[k] for k in single])
  return metrics


def evaluate_examples(eval_cfg: ml_collections.ConfigDict, generator: Generator,
                      examples: dict) -> dict[str, float]:
  """The metrics of the module docstring that `eval_cfg` (`captioning`, `vqa`) asks for."""
  metrics = {}
  if eval_cfg.captioning:
    metrics.update(caption_scores(generator, examples))
  if eval_cfg.vqa:
    metrics.update(vqa_scores(generator, examples))
  return {k: float(v) for k, v in metrics.items()}
