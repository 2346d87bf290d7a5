"""Zero-shot classification: prompt templates from captions, class embeddings from
templates, and accuracy.

Pure functions of embeddings and two callables; no model or dataset is imported. Ties
between classes are broken towards the lower class index, as in `jnp.argmax` and
`jax.lax.top_k` (see `vlm_jax.eval.retrieval`).
"""

import collections
from collections.abc import Callable, Sequence
import re
import string

import jax
import numpy as np

from vlm_jax.eval import retrieval

Array = retrieval.Array
EncodeTextFn = Callable[[np.ndarray, np.ndarray], Array]
TokenizeFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]

PHOTO_TEMPLATES = ('a photo of a {}.',)  # when a dataset's captions give no template
MAX_CAPTION_TEMPLATES = 8  # at most this many templates are taken from captions


def _class_pattern(class_names: Sequence[str]) -> re.Pattern:
  """Matches any class name as whole words, case-insensitively; longer names are tried
  first, so 'golden retriever' is one match, not also 'retriever'."""
  names = sorted({n.strip() for n in class_names if n.strip()}, key=len, reverse=True)
  words = [r'\s+'.join(map(re.escape, n.split())) for n in names]
  return re.compile(r'(?<!\w)(?:' + '|'.join(words) + r')(?!\w)', re.IGNORECASE)


def _escape_braces(text: str) -> str:
  return text.replace('{', '{{').replace('}', '}}')


def templates_from_captions(captions: Sequence[str], class_names: Sequence[str],
                            max_templates: int = MAX_CAPTION_TEMPLATES) -> list[str]:
  """Prompt templates in the wording of a dataset's own captions.

  Every caption that names exactly one class once (whole words, any case; a name may span
  several words) becomes a template with that name replaced by '{}' ('the digit seven' ->
  'the digit {}'); captions naming no class, two classes or one class twice are ignored.
  Literal braces are escaped, so every template formats with one class name.

  Returns:
    At most `max_templates` distinct templates, the most frequent first (ties in
    alphabetical order); empty when no caption names a class.
  """
  if not any(n.strip() for n in class_names):
    return []
  pattern = _class_pattern(class_names)
  counts = collections.Counter()
  for caption in captions:
    caption = caption.strip()
    matches = list(pattern.finditer(caption))
    if len(matches) != 1:
      continue
    start, end = matches[0].span()
    counts[_escape_braces(caption[:start]) + '{}' + _escape_braces(caption[end:])] += 1
  ranked = sorted(counts, key=lambda t: (-counts[t], t))
  return ranked[:max_templates]


def _check_template(template: str) -> None:
  """Raises ValueError unless `template` has exactly one '{}' replacement field."""
  if not isinstance(template, str):
    raise ValueError(f'Prompt templates must be strings, got {template!r}.')
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f'Prompt template {template!r} is not a valid format string: '
                     f'{e}. Write a literal brace as {{{{ or }}}}.') from e
  if fields != ['']:
    raise ValueError(
        f"Prompt template {template!r} must contain exactly one '{{}}' where the class "
        f"name goes, e.g. 'a photo of a {{}}.'; found replacement fields {fields}.")


def _check_strings(name: str, values: Sequence[str]) -> list[str]:
  if isinstance(values, str):
    raise ValueError(f'{name} must be a sequence of strings, not one string {values!r}.')
  values = list(values)
  if not values:
    raise ValueError(f'{name} must not be empty.')
  return values


def class_text_embeddings(encode_text: EncodeTextFn, tokenize: TokenizeFn,
                          class_names: Sequence[str], templates: Sequence[str], *,
                          batch_size: int = 256) -> np.ndarray:
  """Prompt-ensembled class embeddings, as in CLIP.

  Every template is filled with every class name (`template.format(name)`); the prompts
  are tokenized and encoded in batches of one fixed size (the last one padded with
  repeats, so a jitted `encode_text` compiles once); each prompt embedding is
  L2-normalised, averaged over the templates, and the mean re-normalised.

  Args:
    encode_text: maps `tokenize`'s two arrays for B prompts to [B, E] embeddings.
    tokenize: maps B strings to two arrays (e.g. token ids [B, L] and a mask [B, L]).
    class_names: the C class names, in label order.
    templates: the T templates, each with exactly one '{}', e.g. 'a photo of a {}.'.
    batch_size: prompts per `encode_text` call.

  Returns:
    [C, E] float32 unit-norm class embeddings.
  """
  class_names = _check_strings('class_names', class_names)
  templates = _check_strings('templates', templates)
  for template in templates:
    _check_template(template)
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}.')

  prompts = [t.format(name) for name in class_names for t in templates]  # [C * T]
  batch = min(int(batch_size), len(prompts))
  padded = prompts + prompts[-1:] * (-len(prompts) % batch)
  outputs = []
  for start in range(0, len(padded), batch):
    tokens, mask = tokenize(padded[start:start + batch])
    out = np.asarray(encode_text(tokens, mask), np.float32)  # [B, E]
    if out.ndim != 2 or out.shape[0] != batch:
      raise ValueError(f'encode_text must return [{batch}, E] embeddings for {batch} '
                       f'prompts, got shape {out.shape}.')
    outputs.append(out)
  emb = retrieval.check_embeddings('encode_text output',
                                   np.concatenate(outputs)[:len(prompts)])
  emb = emb.reshape(len(class_names), len(templates), -1)  # [C, T, E]
  return np.asarray(_ensemble(emb))


@jax.jit
def _ensemble(emb: jax.Array) -> jax.Array:
  """[C, T, E] prompt embeddings -> [C, E] unit mean of their unit vectors."""
  return retrieval.l2_normalize(retrieval.l2_normalize(emb).mean(axis=1))


def zeroshot_metrics(image_emb: Array, labels: Array, class_emb: Array, *,
                     chunk_size: int = retrieval.DEFAULT_CHUNK_SIZE
                     ) -> dict[str, float]:
  """Zero-shot accuracy of images against class embeddings (cosine similarity).

  Args:
    image_emb: [N, E] image embeddings (normalised here).
    labels: [N] int class indices in [0, C).
    class_emb: [C, E] class embeddings, e.g. from `class_text_embeddings`.
    chunk_size: images scored at once (memory O(chunk_size * C)).

  Returns:
    {'zeroshot_top1', 'zeroshot_mean_per_class'} and, when C >= 5, 'zeroshot_top5'.
    The mean per class is top-1 accuracy averaged over the classes present in `labels`.
  """
  images = retrieval.check_embeddings('image_emb', image_emb)
  classes = retrieval.check_embeddings('class_emb', class_emb)
  retrieval.check_same_dim(image_emb=images, class_emb=classes)
  num_classes = classes.shape[0]
  labels = retrieval.check_indices('labels', labels, images.shape[0], num_classes)
  class_ids = np.arange(num_classes, dtype=np.int32)
  ranks = retrieval.positive_ranks(images, classes, labels, class_ids,
                                   chunk_size=chunk_size)  # [N]
  correct = ranks == 0  # [N]
  per_class = [correct[labels == c].mean() for c in np.unique(labels)]
  metrics = {
      'zeroshot_top1': float(correct.mean()),
      'zeroshot_mean_per_class': float(np.mean(per_class)),
  }
  if num_classes >= 5:
    metrics['zeroshot_top5'] = float(np.mean(ranks < 5))
  return metrics
