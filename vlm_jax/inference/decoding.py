"""Autoregressive decoding over a cached step function: greedy, sampling, beam search.

The whole loop is one `lax.while_loop` with a fixed maximum length, batched and jit-able:
wrap a call in `jax.jit(functools.partial(greedy, step_fn, max_len=..., ...))`. The
integer and float options are static Python values; `step_fn` is traced once for the loop
(and once more, abstractly, by the argument checks).

Model contract:

  step_fn(cache, tokens) -> (logits, cache)

  * `tokens` int32 [N]: the token at the current position of every row.
  * `logits` float [N, V]: unnormalised scores of the NEXT token (cast to float32 here).
  * `cache` a pytree; array leaves with ndim >= 1 have the rows as their leading axis, leaves
    of ndim 0 (e.g. a shared position counter) are shared by all rows. The position is
    implicit in the cache: every call advances all rows by one position. The returned cache
    must have the same structure, shapes and dtypes as the one passed in.

  Decoding starts at position 0 with `prompt[:, 0]`, so the cache passed in is the empty one
  (for a captioner: the image features, nothing decoded yet). `step_fn` is called at most
  `max_len - 1` times (the last token is never fed back), so a KV cache of `max_len - 1`
  positions suffices. Rows that are done keep being fed `pad_id` until the loop ends. Any
  `step_fn` obeying the contract works, e.g. an uncached reference whose cache is the
  whole token buffer plus a position, to benchmark against.

Prompts: `prompt` int32 [B, P] and `prompt_len` int32 [B] with 1 <= prompt_len <= P (the
first token is usually BOS; for VQA the question). While a row is inside its prompt its next
token is forced to the prompt's next token (teacher forcing in the same loop, no separate
prefill), so rows with different prompt lengths decode together. Outputs include the prompt.
Only generated tokens count: a row stops at the first generated `eos_id` (kept in the
output), and then emits `pad_id`; the loop ends when every row is done or at `max_len`
tokens. `lengths` count the tokens before padding (prompt + generated, EOS included).
Under `jax.jit` `prompt_len` cannot be checked, and out-of-range values are clipped to [1, P].

Beam search: the caller's cache has batch B; it is tiled to B*K rows (each row repeated K
times, row-major: row b's beams are rows b*K ... b*K+K-1) and reordered between steps by
gathering along axis 0 (per-row constants such as image features included: keep them in
the cache). A beam that emits EOS is frozen with its final score

  score = sum of generated log-probs / num_generated ** length_penalty

(num_generated counts EOS, not the prompt; length_penalty 0 ranks by the raw sum, 1 by the
mean log-prob per token). Each step keeps the K best of the live beams' extensions and the
frozen beams, all ranked by this score (live ones at their current length).
"""

from collections.abc import Callable
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Cache = Any
StepFn = Callable[[Cache, jax.Array], tuple[jax.Array, Cache]]
# choose(logits [B, V] float32, rng or None) -> tokens [B] int32.
ChooseFn = Callable[[jax.Array, jax.Array | None], jax.Array]


class Decoded(NamedTuple):
  """Greedy or sampled sequences.

  tokens: [B, max_len] int32, prompt then generated tokens, `pad_id` after EOS.
  lengths: [B] int32, tokens before padding (prompt + generated, EOS included).
  log_probs: [B] float32, sum of the model's log-probs (log_softmax of the logits, before
    any temperature or filtering) of the generated tokens.
  """
  tokens: jax.Array
  lengths: jax.Array
  log_probs: jax.Array


class BeamDecoded(NamedTuple):
  """Beam search results; beams are sorted by descending score.

  tokens, lengths, log_probs, scores: the best beam, [B, max_len], [B], [B], [B].
  beam_tokens: [B, K, max_len]; beam_lengths, beam_log_probs, beam_scores: [B, K].
  `log_probs` are raw sums over generated tokens, `scores` the length-normalised ones (see
  the module docstring). A beam with score -inf is a placeholder (the row has fewer than K
  hypotheses of non-zero probability): its tokens are all `pad_id` and its length 0.
  """
  tokens: jax.Array
  lengths: jax.Array
  log_probs: jax.Array
  scores: jax.Array
  beam_tokens: jax.Array
  beam_lengths: jax.Array
  beam_log_probs: jax.Array
  beam_scores: jax.Array


# Argument checks (at trace time).


def _as_int(name: str, value: Any, low: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f'{name} must be a Python int (a static argument), got '
                     f'{value!r}.') from None
  if value < low:
    raise ValueError(f'{name} must be >= {low}, got {value}.')
  return value


def _check_prompt(prompt, prompt_len, max_len: int) -> tuple[jax.Array, jax.Array]:
  """Returns (prompt [B, P] int32, prompt_len [B] int32 clipped to [1, P]) or raises."""
  prompt, prompt_len = jnp.asarray(prompt), jnp.asarray(prompt_len)
  if np.ndim(prompt) != 2 or not jnp.issubdtype(jnp.result_type(prompt), jnp.integer):
    raise ValueError(f'prompt must be an integer [B, P] array, got shape '
                     f'{np.shape(prompt)} dtype {jnp.result_type(prompt)}.')
  batch, width = np.shape(prompt)
  if batch == 0 or width == 0:
    raise ValueError(f'prompt must be non-empty, got shape {(batch, width)}.')
  if np.shape(prompt_len) != (batch,) or not jnp.issubdtype(
      jnp.result_type(prompt_len), jnp.integer):
    raise ValueError(f'prompt_len must be an integer [B] = ({batch},) array, got shape '
                     f'{np.shape(prompt_len)} dtype {jnp.result_type(prompt_len)}.')
  if max_len <= width:
    raise ValueError(f'max_len ({max_len}) must exceed the prompt width P = {width}, so '
                     'that every row can generate at least one token.')
  try:
    values = np.asarray(prompt_len)
  except jax.errors.TracerArrayConversionError:
    values = None  # Traced under jit: clipped below instead.
  if values is not None and (values.min() < 1 or values.max() > width):
    raise ValueError(f'prompt_len values must lie in [1, P = {width}], got range '
                     f'[{values.min()}, {values.max()}].')
  return (jnp.asarray(prompt, jnp.int32),
          jnp.clip(jnp.asarray(prompt_len, jnp.int32), 1, width))


def _check_cache(cache: Cache, rows: int) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    shape = np.shape(leaf)
    if len(shape) >= 1 and shape[0] != rows:
      raise ValueError(f'cache leaf {jax.tree_util.keystr(path)} has shape {shape}: '
                       f'leaves with ndim >= 1 must have the batch ({rows}) leading.')


def _check_step_fn(step_fn: StepFn, cache: Cache, rows: int, *ids: tuple[str, int]) -> int:
  """Traces `step_fn` abstractly; returns the vocabulary size V or raises ValueError."""
  _check_cache(cache, rows)
  tokens = jax.ShapeDtypeStruct((rows,), jnp.int32)
  logits, new_cache = jax.eval_shape(step_fn, cache, tokens)
  if len(logits.shape) != 2 or logits.shape[0] != rows:
    raise ValueError(f'step_fn must return logits of shape [N, V] = [{rows}, V], got '
                     f'{logits.shape}.')
  old = jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), cache)
  new = jax.tree.map(lambda x: (x.shape, x.dtype), new_cache)
  if jax.tree.structure(old) != jax.tree.structure(new) or old != new:
    raise ValueError('step_fn must return a cache with the structure, shapes and dtypes of '
                     f'the one it was given; got\n{new}\nfor\n{old}.')
  vocab = logits.shape[1]
  for name, value in ids:
    if not 0 <= value < vocab:
      raise ValueError(f'{name} ({value}) must lie in [0, V = {vocab}).')
  return vocab


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if temperature == 0:
    raise ValueError('temperature 0 means argmax decoding: call greedy() instead.')
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}.')
  _as_int('top_k', top_k, 0)
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must lie in (0, 1], got {top_p!r}.')


def _gather_rows(tree: Cache, rows: jax.Array) -> Cache:
  """Leaves with ndim >= 1 gathered along axis 0 (`x[rows]`); scalars unchanged."""
  return jax.tree.map(lambda x: x[rows] if jnp.ndim(x) >= 1 else x, tree)


def _initial_tokens(prompt, prompt_len, max_len: int, pad_id: int) -> jax.Array:
  """[B, max_len] int32: the prompts, `pad_id` elsewhere."""
  batch, width = prompt.shape
  tokens = jnp.full((batch, max_len), pad_id, jnp.int32).at[:, :width].set(prompt)
  return jnp.where(jnp.arange(max_len) < prompt_len[:, None], tokens, pad_id)


def _column(x: jax.Array, t: jax.Array) -> jax.Array:
  """x[..., t] for a traced index t."""
  return jax.lax.dynamic_index_in_dim(x, t, axis=-1, keepdims=False)


# Greedy and sampling.


def decode_loop(step_fn: StepFn, cache: Cache, prompt: jax.Array, prompt_len: jax.Array,
                choose: ChooseFn, *, max_len: int, eos_id: int, pad_id: int,
                rng: jax.Array | None = None) -> Decoded:
  """One sequence per row; `choose(logits [B, V], rng_t) -> [B]` picks each next token.

  `rng_t` is `jax.random.fold_in(rng, t)` at step t, or None when `rng` is None.
  """
  max_len = _as_int('max_len', max_len, 2)
  eos_id, pad_id = _as_int('eos_id', eos_id, 0), _as_int('pad_id', pad_id, 0)
  prompt, prompt_len = _check_prompt(prompt, prompt_len, max_len)
  batch = prompt.shape[0]
  _check_step_fn(step_fn, cache, batch, ('eos_id', eos_id), ('pad_id', pad_id))

  def body(state):
    t, cache, tokens, done, lengths, log_probs = state
    logits, cache = step_fn(cache, _column(tokens, t))
    logits = logits.astype(jnp.float32)  # [B, V]
    pos = t + 1
    generated = pos >= prompt_len  # [B]
    choice = choose(logits, None if rng is None else jax.random.fold_in(rng, t))
    choice = choice.astype(jnp.int32)
    token = jnp.where(generated, jnp.where(done, pad_id, choice), _column(tokens, pos))
    active = generated & ~done
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[:, None], axis=1)[:, 0]
    log_probs = log_probs + jnp.where(active, logp, 0.0)
    finished = active & (token == eos_id)
    lengths = jnp.where(finished, pos + 1, lengths)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, pos, axis=1)
    return t + 1, cache, tokens, done | finished, lengths, log_probs

  def cond(state):
    t, _, _, done, _, _ = state
    return (t < max_len - 1) & ~jnp.all(done)

  state = (jnp.int32(0), cache, _initial_tokens(prompt, prompt_len, max_len, pad_id),
           jnp.zeros(batch, bool), jnp.full(batch, max_len, jnp.int32),
           jnp.zeros(batch, jnp.float32))
  _, _, tokens, _, lengths, log_probs = jax.lax.while_loop(cond, body, state)
  return Decoded(tokens, lengths, log_probs)


def greedy(step_fn: StepFn, cache: Cache, prompt: jax.Array, prompt_len: jax.Array, *,
           max_len: int, eos_id: int, pad_id: int) -> Decoded:
  """Argmax decoding (ties go to the lowest token id). See the module docstring."""
  choose = lambda logits, _: jnp.argmax(logits, axis=-1)
  return decode_loop(step_fn, cache, prompt, prompt_len, choose, max_len=max_len,
                     eos_id=eos_id, pad_id=pad_id)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Sampling logits [..., V]: divided by `temperature`, filtered tokens set to -inf.

  Filters compose in this order: temperature, then top-k (keep the k highest; ties go to
  the lowest ids, so exactly k tokens remain; 0 = off), then nucleus top-p on the
  renormalised result (keep the smallest set of highest-probability tokens whose mass is
  >= top_p; always at least one token; 1.0 = off).
  """
  _check_sampling(temperature, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32) / temperature
  vocab = logits.shape[-1]
  if (top_k == 0 or top_k >= vocab) and top_p >= 1:
    return logits
  flat = logits.reshape(-1, vocab)  # [N, V]
  order = jnp.argsort(-flat, axis=-1, stable=True)  # [N, V], best first
  ranked = jnp.take_along_axis(flat, order, axis=-1)
  keep = jnp.ones_like(ranked, bool)
  if 0 < top_k < vocab:
    keep = jnp.broadcast_to(jnp.arange(vocab) < top_k, ranked.shape)
  if top_p < 1:
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    keep = keep & (mass_before < top_p)
  rows = jnp.arange(flat.shape[0])[:, None]
  keep = jnp.zeros_like(keep).at[rows, order].set(keep)  # back to token order
  return jnp.where(keep, flat, -jnp.inf).reshape(logits.shape)


def sample(step_fn: StepFn, cache: Cache, prompt: jax.Array, prompt_len: jax.Array,
           rng: jax.Array, *, max_len: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Decoded:
  """Ancestral sampling from `filter_logits(logits, ...)`; rows draw independently.

  temperature 0 is refused (use `greedy`). `log_probs` are under the unfiltered model.
  """
  _check_sampling(temperature, top_k, top_p)

  def choose(logits, key):
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1)

  return decode_loop(step_fn, cache, prompt, prompt_len, choose, max_len=max_len,
                     eos_id=eos_id, pad_id=pad_id, rng=rng)


# Beam search.


def _normalise(log_probs: jax.Array, num_generated: jax.Array, alpha: float) -> jax.Array:
  """log_probs / num_generated ** alpha, with num_generated floored at 1."""
  if alpha == 0:
    return log_probs
  return log_probs / jnp.maximum(num_generated, 1).astype(jnp.float32) ** alpha


def beam_search(step_fn: StepFn, cache: Cache, prompt: jax.Array, prompt_len: jax.Array,
                *, beam_size: int, max_len: int, eos_id: int, pad_id: int,
                length_penalty: float = 1.0) -> BeamDecoded:
  """Beam search with `beam_size` (K) beams per row; see the module docstring.

  `cache` has batch B; it is tiled to B*K rows (row b's beams are rows b*K ... b*K+K-1).
  With K = 1 the result equals `greedy` (up to ties created by float rounding of the
  running sums). Beams are sorted by descending score; placeholders score -inf.
  """
  k = _as_int('beam_size', beam_size, 1)
  max_len = _as_int('max_len', max_len, 2)
  eos_id, pad_id = _as_int('eos_id', eos_id, 0), _as_int('pad_id', pad_id, 0)
  if not length_penalty >= 0:
    raise ValueError(f'length_penalty must be >= 0, got {length_penalty!r}.')
  prompt, prompt_len = _check_prompt(prompt, prompt_len, max_len)
  batch = prompt.shape[0]
  vocab = _check_step_fn(step_fn, cache, batch, ('eos_id', eos_id), ('pad_id', pad_id))
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if jnp.ndim(x) >= 1 else x, cache)
  ids = jnp.arange(vocab)
  offsets = (jnp.arange(batch) * k)[:, None]  # [B, 1] first cache row of each batch row
  neg_inf = jnp.float32(-jnp.inf)

  def body(state):
    t, cache, tokens, finished, lengths, log_probs = state  # tokens [B, K, T]
    logits, cache = step_fn(cache, _column(tokens, t).reshape(batch * k))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    pos = t + 1
    generated = (pos >= prompt_len)[:, None, None]  # [B, 1, 1]
    forced = (ids == _column(tokens[:, 0], pos)[:, None, None])  # [B, 1, V]
    cand = log_probs[..., None] + jnp.where(
        generated, logp, jnp.where(forced, 0.0, neg_inf))  # [B, K, V]
    # A frozen beam's only continuation is itself, padded, with its score unchanged.
    frozen = jnp.where(ids == pad_id, log_probs[..., None], neg_inf)
    cand = jnp.where(finished[..., None], frozen, cand)
    num_generated = jnp.where(finished, lengths, pos + 1) - prompt_len[:, None]  # [B, K]
    rank = _normalise(cand, num_generated[..., None], length_penalty)
    _, flat = jax.lax.top_k(rank.reshape(batch, k * vocab), k)  # [B, K]
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    log_probs = jnp.take_along_axis(cand.reshape(batch, k * vocab), flat, axis=1)
    was_finished = jnp.take_along_axis(finished, parent, axis=1)
    token = jnp.where(was_finished, pad_id, token)
    ends = ~was_finished & (token == eos_id) & generated[:, :, 0]
    lengths = jnp.where(ends, pos + 1, jnp.take_along_axis(lengths, parent, axis=1))
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, pos, axis=2)
    cache = _gather_rows(cache, (offsets + parent).reshape(-1))
    return t + 1, cache, tokens, was_finished | ends, lengths, log_probs

  def cond(state):
    t, _, _, finished, _, log_probs = state
    return (t < max_len - 1) & ~jnp.all(finished | (log_probs == neg_inf))

  tokens = _initial_tokens(prompt, prompt_len, max_len, pad_id)
  state = (jnp.int32(0), cache, jnp.repeat(tokens[:, None], k, axis=1),
           jnp.zeros((batch, k), bool), jnp.full((batch, k), max_len, jnp.int32),
           jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(neg_inf))  # one live beam
  _, _, tokens, _, lengths, log_probs = jax.lax.while_loop(cond, body, state)

  scores = _normalise(log_probs, lengths - prompt_len[:, None], length_penalty)
  order = jnp.argsort(-scores, axis=1, stable=True)
  scores, log_probs, lengths = (jnp.take_along_axis(x, order, axis=1)
                                for x in (scores, log_probs, lengths))
  tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)
  placeholder = scores == neg_inf
  tokens = jnp.where(placeholder[..., None], pad_id, tokens)
  lengths = jnp.where(placeholder, 0, lengths)
  return BeamDecoded(tokens[:, 0], lengths[:, 0], log_probs[:, 0], scores[:, 0],
                     tokens, lengths, log_probs, scores)
