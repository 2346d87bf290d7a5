"""Captions and answers of images from a captioner (a model with `init_cache` and
`decode_step`, e.g. CoCa): one jitted decoding function, batched over images.

A caption is decoded from the prompt `[BOS]`; an answer from `[BOS] question`. The decoding
rule is greedy by default, beam search with `beams` > 1, sampling with `temperature` > 0
(see `vlm_jax.inference.decoding`).

`load_image` / `image_pixels` turn an image file (or PIL image) of any size and mode into the
model's uint8 input pixels, as `vlm_jax.data.image_convert` converts dataset images (shared by
`vlm_jax.generate` and `vlm_jax.search`).
"""
import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_jax.data import image_convert
from vlm_jax.data import vqa
from vlm_jax.inference import decoding
from vlm_jax.models import lora


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to choose tokens: greedy (defaults), beam search (beams > 1) or sampling
  (temperature > 0, with top_k / top_p)."""
  beams: int = 1
  length_penalty: float = 1.0
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def check(self) -> None:
    if self.beams < 1:
      raise ValueError(f'beams must be >= 1, got {self.beams}.')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}.')
    if self.beams > 1 and self.temperature > 0:
      raise ValueError('Choose beam search (beams > 1) or sampling (temperature > 0), not both.')
    if self.temperature == 0 and (self.top_k or self.top_p < 1):
      raise ValueError('top_k and top_p apply to sampling: set temperature > 0.')


def is_captioner(model: nn.Module) -> bool:
  return hasattr(model, 'init_cache') and hasattr(model, 'decode_step')


def _decode(model: nn.Module, options: DecodeOptions, max_len: int, eos_id: int, pad_id: int,
            params: Any, images: jax.Array, prompt: jax.Array, prompt_len: jax.Array,
            rng: jax.Array) -> jax.Array:
  """Tokens [B, max_len] (prompt included) of the images [B, H, W, 3]."""
  model, params = lora.unwrap(model, params)  # LoRA factors merged once, not at every step
  variables = {'params': params}
  cache = model.apply(variables, images, max_len, method=model.init_cache)
  step = lambda c, t: model.apply(variables, c, t, method=model.decode_step)
  kwargs = dict(max_len=max_len, eos_id=eos_id, pad_id=pad_id)
  if options.beams > 1:
    return decoding.beam_search(step, cache, prompt, prompt_len, beam_size=options.beams,
                                length_penalty=options.length_penalty, **kwargs).tokens
  if options.temperature > 0:
    return decoding.sample(step, cache, prompt, prompt_len, rng,
                           temperature=options.temperature, top_k=options.top_k,
                           top_p=options.top_p, **kwargs).tokens
  return decoding.greedy(step, cache, prompt, prompt_len, **kwargs).tokens


class Generator:
  """Jitted caption and answer decoding for a captioner and its parameters.

  `params` may be host arrays, arrays on one device, or global arrays on a mesh (then pass
  `parallel_cfg`, the `parallel` config group: batches are split over its batch axes, as
  `vlm_jax.eval.runner.Embedder` does).
  """

  def __init__(self, model: nn.Module, params: Any, tokenizer, max_len: int,
               batch_size: int, parallel_cfg: ml_collections.ConfigDict | None = None,
               options: DecodeOptions = DecodeOptions()):
    from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top (runner imports eval)
    if not is_captioner(model):
      raise ValueError(f'{type(model).__name__} does not generate text (it has no '
                       'init_cache / decode_step); captioning needs e.g. model.name=coca.')
    if tokenizer.bos_id is None:
      raise ValueError('Decoding starts from the BOS token, and this tokenizer has none.')
    options.check()
    self.tokenizer, self.max_len, self.options = tokenizer, max_len, options
    self._params = params
    fn = functools.partial(_decode, model, options, max_len, tokenizer.eos_id,
                           tokenizer.pad_id)
    mesh = runner.params_mesh(params) if parallel_cfg is not None else None
    if mesh is None:
      self._put, self._fn = (lambda x: x), jax.jit(fn)
    else:
      placement = runner.Placement(mesh, parallel_cfg)
      batch_size = -(-batch_size // placement.num_shards) * placement.num_shards
      self._put = placement.put
      self._fn = jax.jit(fn, out_shardings=placement.replicated)
    self.batch_size = batch_size
    self._rng = jax.random.key(options.seed)

  def _tokens(self, images: np.ndarray, prompt: np.ndarray, prompt_len: np.ndarray
              ) -> np.ndarray:
    """[N, ...] inputs -> tokens [N, max_len], in fixed-size batches (one compilation)."""
    from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top

    def batch_fn(images, prompt, prompt_len):
      self._rng, rng = jax.random.split(self._rng)
      return self._fn(self._params, self._put(images), self._put(prompt),
                      self._put(prompt_len), rng)

    return runner.batched(batch_fn, self.batch_size, images, prompt, prompt_len)

  def _texts(self, tokens: np.ndarray, prompt_len: np.ndarray) -> list[str]:
    """The generated part of each row (after its prompt, up to EOS) as text."""
    return [self.tokenizer.decode(row[n:]) for row, n in zip(tokens, prompt_len)]

  def captions(self, images: np.ndarray) -> list[str]:
    """Normalised images [N, H, W, 3] -> N captions."""
    n = len(images)
    if n == 0:
      return []
    prompt = np.full((n, 1), self.tokenizer.bos_id, np.int32)
    prompt_len = np.ones((n,), np.int32)
    return self._texts(self._tokens(images, prompt, prompt_len), prompt_len)

  def answers(self, images: np.ndarray, questions: Sequence[str]) -> list[str]:
    """Normalised images [N, H, W, 3] and N questions -> N answers."""
    if len(images) != len(questions):
      raise ValueError(f'{len(images)} images but {len(questions)} questions.')
    if not len(questions):  # pylint: disable=g-explicit-length-test
      return []
    # Prompts one token narrower than the decoded rows, so that every row can generate.
    prompt, prompt_len = vqa.question_prompts(self.tokenizer, questions, self.max_len - 1)
    return self._texts(self._tokens(images, prompt, prompt_len), prompt_len)


def image_pixels(img: Image.Image, size: int, resize: str = 'squash') -> np.ndarray:
  """uint8 [size, size, 3] RGB pixels of a PIL image of any mode (16-bit, alpha, palette...),
  resized by `resize` ('squash' | 'crop', see `vlm_jax.data.image_convert`)."""
  rgb = image_convert.to_rgb(img)
  if rgb.size == (size, size):
    return np.asarray(rgb, np.uint8)
  return image_convert.resize(rgb, size, resize)


def load_image(path: str, size: int, resize: str = 'squash') -> np.ndarray:
  """uint8 [size, size, 3] RGB pixels of the image file at `path` (any format and mode PIL
  reads), resized; a ValueError naming the file if it cannot be read."""
  try:
    with Image.open(path) as img:
      return image_pixels(img, size, resize)
  except (OSError, UnidentifiedImageError) as e:
    raise ValueError(f'Cannot read image {path!r}: {e}') from None


def generation_max_len(config: ml_collections.ConfigDict) -> int:
  """The longest decoded sequence of a run: its learned text positions."""
  return int(config.model.text.max_len or config.data.max_text_len)

