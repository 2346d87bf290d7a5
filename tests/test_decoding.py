"""Tests for vlm_jax.inference.decoding on a hand-built second-order Markov "model".

The model's logits for the next token are `table[pos, prev, token] + bias[row]`, with
`prev` (the token before the current one) and the per-row `bias` in the cache and `pos` a
shared scalar leaf: a beam search that tiled or reordered the cache wrongly would score
sequences with the wrong history or row and disagree with the NumPy references.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vlm_jax.inference import decoding

PAD, EOS = 0, 1
INIT_PREV = 2  # the `prev` of position 0


def model(table, bias):
  """(step_fn, cache) with the table closed over (it is not per-row)."""
  table = jnp.asarray(table, jnp.float32)

  def step(cache, tokens):
    logits = table[cache['pos'], cache['prev'], tokens] + cache['bias']
    return logits, dict(cache, pos=cache['pos'] + 1, prev=tokens)

  cache = {'pos': jnp.int32(0), 'prev': jnp.full(len(bias), INIT_PREV, jnp.int32),
           'bias': jnp.asarray(bias, jnp.float32)}
  return step, cache


def random_model(seed, batch, vocab, max_len, scale=2.0):
  rng = np.random.default_rng(seed)
  table = scale * rng.normal(size=(max_len, vocab, vocab, vocab))
  bias = rng.normal(size=(batch, vocab))
  return table, bias


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def ref_step_logits(table, bias_row, seq, t):
  prev = INIT_PREV if t == 0 else seq[t - 1]
  return np.asarray(table[t, prev, seq[t]], np.float64) + bias_row


def ref_log_prob(table, bias_row, seq, prompt_len):
  """Sum of the model's log-probs of seq[prompt_len:] (float64)."""
  return sum(log_softmax(ref_step_logits(table, bias_row, seq, t))[seq[t + 1]]
             for t in range(prompt_len - 1, len(seq) - 1))


def ref_greedy(table, bias_row, prompt, max_len):
  seq = list(prompt)
  while len(seq) < max_len:
    seq.append(int(np.argmax(ref_step_logits(table, bias_row, seq, len(seq) - 1))))
    if seq[-1] == EOS:
      break
  return seq


def ref_best(table, bias_row, prompt, max_len, vocab, alpha):
  """Brute force over every complete continuation: (best sequence, its score)."""
  best, best_score = None, -np.inf
  for n in range(1, max_len - len(prompt) + 1):
    for gen in itertools.product(range(vocab), repeat=n):
      if EOS in gen[:-1] or (gen[-1] != EOS and n < max_len - len(prompt)):
        continue  # Not complete: stopped early without EOS, or continued after it.
      seq = list(prompt) + list(gen)
      score = ref_log_prob(table, bias_row, seq, len(prompt)) / n**alpha
      if score > best_score:
        best, best_score = seq, score
  return best, best_score


def padded(seqs, width, fill=PAD):
  out = np.full((len(seqs), width), fill, np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


def unpad(tokens, lengths):
  return [list(map(int, row[:n])) for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


# Greedy and prompts.


def test_greedy_forces_prompts_of_different_lengths():
  vocab, max_len = 6, 7
  table, bias = random_model(0, 4, vocab, max_len)
  prompts = [[3], [4, 5, 2], [5, 3], [2, 2, 4]]
  # Columns past a row's prompt hold junk that must be ignored.
  prompt = padded(prompts, 3, fill=5)
  step, cache = model(table, bias)
  out = decoding.greedy(step, cache, prompt, np.array([1, 3, 2, 3]), max_len=max_len,
                        eos_id=EOS, pad_id=PAD)
  expected = [ref_greedy(table, bias[b], p, max_len) for b, p in enumerate(prompts)]
  assert unpad(out.tokens, out.lengths) == expected
  np.testing.assert_array_equal(out.tokens, padded(expected, max_len))
  np.testing.assert_allclose(
      out.log_probs, [ref_log_prob(table, bias[b], s, len(p))
                      for b, (s, p) in enumerate(zip(expected, prompts))], rtol=1e-5)


def eos_model(eos_step, vocab=5, max_len=8, batch=3):
  """Prefers token 3 everywhere, except EOS at position eos_step[row] (1-based)."""
  table = np.zeros((max_len, vocab, vocab, vocab))
  table[..., 3] = 5.0
  bias = np.zeros((batch, vocab))
  step, cache = model(table, bias)

  def eos_step_fn(cache, tokens):
    logits, new = step(cache, tokens)
    hit = (cache['pos'] + 1) == cache['eos_step']  # per-row leaf: tiled for beams
    return jnp.where(hit[:, None], 20.0 * (jnp.arange(vocab) == EOS), logits), new

  return eos_step_fn, dict(cache, eos_step=jnp.asarray(eos_step, jnp.int32))


def test_eos_stops_a_row_and_pads_after():
  step, cache = eos_model([2, 4, 100])
  prompt = np.full((3, 1), 4, np.int32)
  for decode in (decoding.greedy, functools.partial(decoding.beam_search, beam_size=2)):
    out = decode(step, cache, prompt, np.ones(3, np.int32), max_len=6, eos_id=EOS,
                 pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, [[4, 3, EOS, PAD, PAD, PAD],
                                               [4, 3, 3, 3, EOS, PAD],
                                               [4, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(out.lengths, [3, 5, 6])


def test_eos_inside_the_prompt_does_not_stop():
  step, cache = eos_model([100, 100, 100])
  prompt = np.array([[4, EOS, 3]] * 3, np.int32)
  out = decoding.greedy(step, cache, prompt, np.array([1, 2, 3]), max_len=5, eos_id=EOS,
                        pad_id=PAD)
  np.testing.assert_array_equal(out.tokens, [[4, 3, 3, 3, 3], [4, EOS, 3, 3, 3],
                                             [4, EOS, 3, 3, 3]])
  np.testing.assert_array_equal(out.lengths, [5, 5, 5])


# Beam search.


def test_beam_one_equals_greedy():
  vocab, max_len = 7, 9
  table, bias = random_model(1, 5, vocab, max_len, scale=1.0)
  prompts = [[3], [4, 5], [6, 2, 3], [2], [5, 5]]
  prompt, prompt_len = padded(prompts, 3), np.array([len(p) for p in prompts])
  step, cache = model(table, bias)
  kwargs = dict(max_len=max_len, eos_id=EOS, pad_id=PAD)
  g = decoding.greedy(step, cache, prompt, prompt_len, **kwargs)
  lengths = np.asarray(g.lengths)
  assert (lengths < max_len).any() and (lengths == max_len).any()  # EOS and truncation
  for alpha in (0.0, 1.0):
    b = decoding.beam_search(step, cache, prompt, prompt_len, beam_size=1,
                             length_penalty=alpha, **kwargs)
    np.testing.assert_array_equal(b.tokens, g.tokens)
    np.testing.assert_array_equal(b.lengths, g.lengths)
    np.testing.assert_allclose(b.log_probs, g.log_probs, rtol=1e-6)
    np.testing.assert_array_equal(b.beam_tokens[:, 0], g.tokens)


@pytest.mark.parametrize('alpha', [0.0, 0.6, 1.0])
def test_exhaustive_beam_finds_the_brute_force_optimum(alpha):
  # K >= the number of complete hypotheses, so nothing is ever pruned.
  vocab, max_len, k = 4, 5, 128
  table, bias = random_model(2, 3, vocab, max_len, scale=1.5)
  prompts = [[3], [2, 3], [3, 2]]
  prompt, prompt_len = padded(prompts, 2), np.array([1, 2, 2])
  step, cache = model(table, bias)
  out = decoding.beam_search(step, cache, prompt, prompt_len, beam_size=k, max_len=max_len,
                             eos_id=EOS, pad_id=PAD, length_penalty=alpha)
  for b, p in enumerate(prompts):
    best, score = ref_best(table, bias[b], p, max_len, vocab, alpha)
    assert unpad(out.tokens, out.lengths)[b] == best
    np.testing.assert_allclose(out.scores[b], score, rtol=1e-5)
    # Every beam's score is its own log-prob, normalised; beams come sorted.
    for seq, lp, sc in zip(unpad(out.beam_tokens[b], out.beam_lengths[b]),
                           out.beam_log_probs[b], out.beam_scores[b]):
      if np.isfinite(sc):
        n = len(seq) - len(p)
        np.testing.assert_allclose(lp, ref_log_prob(table, bias[b], seq, len(p)),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sc, lp / n**alpha, rtol=1e-6)
    scores = np.asarray(out.beam_scores[b])
    assert (scores[:-1] >= scores[1:]).all()


def test_beam_beats_greedy_when_greedy_is_not_optimal():
  # First-order chain: after BOS(4) 'a'(2) 0.6, 'b'(3) 0.4; after 'a' the mass is spread,
  # after 'b' EOS has 0.9. Greedy: a a (0.216); best: b EOS (0.36).
  vocab, max_len = 5, 3
  probs = np.full((vocab, vocab), 1e-6)
  probs[4, [2, 3]] = [0.6, 0.4]
  probs[2, [EOS, 2, 3]] = [0.30, 0.36, 0.34]
  probs[3, [EOS, 2, 3]] = [0.90, 0.05, 0.05]
  table = np.broadcast_to(np.log(probs)[None, None], (max_len, vocab, vocab, vocab))
  step, cache = model(table, np.zeros((1, vocab)))
  prompt, prompt_len = np.array([[4]]), np.array([1])
  kwargs = dict(max_len=max_len, eos_id=EOS, pad_id=PAD)
  g = decoding.greedy(step, cache, prompt, prompt_len, **kwargs)
  b = decoding.beam_search(step, cache, prompt, prompt_len, beam_size=2,
                           length_penalty=0.0, **kwargs)
  assert np.asarray(g.tokens).tolist() == [[4, 2, 2]]
  assert np.asarray(b.tokens).tolist() == [[4, 3, EOS]]
  assert b.log_probs[0] > g.log_probs[0]
  np.testing.assert_allclose(b.scores[0], np.log(0.36), rtol=1e-5)
  assert ref_best(table, np.zeros(vocab), [4], max_len, vocab, 0.0)[0] == [4, 3, EOS]


def test_beam_placeholders_when_fewer_hypotheses_than_beams():
  # One generated token over V = 4 tokens: only 4 hypotheses for 6 beams.
  table, bias = random_model(3, 2, 4, 2)
  step, cache = model(table, bias)
  out = decoding.beam_search(step, cache, np.array([[3], [2]]), np.array([1, 1]),
                             beam_size=6, max_len=2, eos_id=EOS, pad_id=PAD)
  scores = np.asarray(out.beam_scores)
  assert np.isfinite(scores[:, :4]).all() and (scores[:, 4:] == -np.inf).all()
  assert (np.asarray(out.beam_tokens)[:, 4:] == PAD).all()
  assert (np.asarray(out.beam_lengths)[:, 4:] == 0).all()
  assert sorted(np.asarray(out.beam_tokens)[0, :4, 1].tolist()) == [0, 1, 2, 3]


def test_decoding_under_jit():
  vocab, max_len = 6, 7
  table, bias = random_model(4, 3, vocab, max_len)
  step, cache = model(table, bias)
  prompts = [[3], [4, 5], [2]]
  prompt, prompt_len = padded(prompts, 2), np.array([1, 2, 1])
  expected = padded([ref_greedy(table, bias[b], p, max_len) for b, p in enumerate(prompts)],
                    max_len)
  kwargs = dict(max_len=max_len, eos_id=EOS, pad_id=PAD)
  greedy = jax.jit(functools.partial(decoding.greedy, step, **kwargs))
  beam = jax.jit(functools.partial(decoding.beam_search, step, beam_size=1, **kwargs))
  sampler = jax.jit(functools.partial(decoding.sample, step, top_k=1, **kwargs))
  np.testing.assert_array_equal(greedy(cache, prompt, prompt_len).tokens, expected)
  np.testing.assert_array_equal(beam(cache, prompt, prompt_len).tokens, expected)
  np.testing.assert_array_equal(
      sampler(cache, prompt, prompt_len, jax.random.key(0)).tokens, expected)


# Sampling.


def test_top_k_one_sampling_equals_greedy():
  vocab, max_len = 8, 8
  table, bias = random_model(5, 6, vocab, max_len, scale=1.0)
  step, cache = model(table, bias)
  prompt, prompt_len = padded([[3], [4, 5], [2], [7], [6, 6], [5]], 2), np.array(
      [1, 2, 1, 1, 2, 1])
  kwargs = dict(max_len=max_len, eos_id=EOS, pad_id=PAD)
  g = decoding.greedy(step, cache, prompt, prompt_len, **kwargs)
  s = decoding.sample(step, cache, prompt, prompt_len, jax.random.key(1), top_k=1,
                      temperature=0.7, **kwargs)
  np.testing.assert_array_equal(s.tokens, g.tokens)
  np.testing.assert_allclose(s.log_probs, g.log_probs, rtol=1e-6)


def ref_keep(logits, temperature, top_k, top_p):
  """NumPy nucleus reference: (keep mask, distance of the cut's mass from top_p)."""
  logits = np.asarray(logits, np.float64) / temperature
  keep = np.zeros(logits.shape, bool)
  margin = np.inf
  for i, row in enumerate(logits):
    order = np.argsort(-row, kind='stable')
    if top_k:
      order = order[:top_k]
    probs = np.exp(row[order] - row[order].max())
    cum = np.cumsum(probs / probs.sum())
    n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1 else len(order)
    keep[i, order[:min(n, len(order))]] = True
    if top_p < 1:
      margin = min(margin, np.abs(cum - top_p).min())
  return keep, margin


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 0, 0.9), (1.0, 0, 0.5), (0.5, 0, 0.7), (2.0, 5, 0.8), (1.0, 4, 1.0),
    (1.0, 0, 1e-6), (1.0, 20, 0.95)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  logits = 3 * np.random.default_rng(6).normal(size=(64, 12)).astype(np.float32)
  out = np.asarray(decoding.filter_logits(logits, temperature=temperature, top_k=top_k,
                                          top_p=top_p))
  keep, margin = ref_keep(logits, temperature, top_k if top_k < 12 else 0, top_p)
  assert margin > 1e-5  # no row sits on the boundary, where float32 could differ
  np.testing.assert_array_equal(np.isfinite(out), keep)
  np.testing.assert_allclose(out[keep], (logits / temperature)[keep], rtol=1e-6)
  if top_p < 1:  # the kept set is the smallest with mass >= top_p
    assert keep.sum(1).min() >= 1


def test_filter_logits_keeps_exactly_k_on_ties():
  out = decoding.filter_logits(np.array([[1.0, 3.0, 3.0, 0.0, 3.0]]), top_k=2)
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, False, False]])


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (0.6, 0, 1.0), (1.0, 0, 0.75),
    (0.8, 5, 0.9),  # top-k first matters: top-p alone would keep 5 tokens, here 4
])
def test_sampling_frequencies_match_the_distribution(temperature, top_k, top_p):
  vocab, n = 8, 20000
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0])
  table = np.broadcast_to(logits, (2, vocab, vocab, vocab))
  step, cache = model(table, np.zeros((n, vocab)))
  out = decoding.sample(step, cache, np.full((n, 1), 3), np.ones(n, np.int32),
                        jax.random.key(7), max_len=2, eos_id=EOS, pad_id=PAD,
                        temperature=temperature, top_k=top_k, top_p=top_p)
  counts = np.bincount(np.asarray(out.tokens)[:, 1], minlength=vocab)
  keep, _ = ref_keep(logits[None], temperature, top_k, top_p)
  probs = np.where(keep[0], np.exp(logits / temperature), 0.0)
  probs /= probs.sum()
  assert (counts[~keep[0]] == 0).all()
  result = stats.chisquare(counts[keep[0]], n * probs[keep[0]])
  assert result.pvalue > 1e-3, (counts, n * probs)
  # log_probs are under the unfiltered model.
  np.testing.assert_allclose(np.asarray(out.log_probs),
                             log_softmax(logits)[np.asarray(out.tokens)[:, 1]], rtol=1e-5)


# Argument checks.


def _call(fn=decoding.greedy, prompt=((3, 4),), prompt_len=(2,), **kwargs):
  table, bias = random_model(8, len(prompt), 5, 6)
  step, cache = model(table, bias)
  kwargs = dict(dict(max_len=5, eos_id=EOS, pad_id=PAD), **kwargs)
  return fn(kwargs.pop('step', step), kwargs.pop('cache', cache), np.array(prompt),
            np.array(prompt_len), **kwargs)


@pytest.mark.parametrize('kwargs,message', [
    (dict(fn=decoding.beam_search, beam_size=0), 'beam_size must be >= 1'),
    (dict(max_len=2), r'max_len \(2\) must exceed the prompt width P = 2'),
    (dict(prompt_len=(0,)), r'prompt_len values must lie in \[1, P = 2\]'),
    (dict(prompt_len=(3,)), r'prompt_len values must lie in \[1, P = 2\]'),
    (dict(prompt_len=(1, 2)), 'prompt_len must be an integer'),
    (dict(prompt=(3, 4)), r'prompt must be an integer \[B, P\]'),
    (dict(eos_id=9), r'eos_id \(9\) must lie in \[0, V = 5\)'),
    (dict(max_len=5.0), 'max_len must be a Python int'),
    (dict(cache={'pos': jnp.int32(0), 'prev': jnp.zeros(3, jnp.int32),
                 'bias': jnp.zeros((1, 5))}), r"cache leaf \['prev'\] has shape \(3,\)"),
    (dict(step=lambda c, t: (jnp.zeros((5,)), c)), r'logits of shape \[N, V\]'),
    (dict(step=lambda c, t: (jnp.zeros((1, 5)), {})), 'step_fn must return a cache'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _call(**kwargs)


@pytest.mark.parametrize('kwargs,message', [
    (dict(temperature=0.0), r'call greedy\(\)'),
    (dict(temperature=-1.0), 'temperature must be > 0'),
    (dict(top_p=0.0), r'top_p must lie in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must lie in \(0, 1\]'),
    (dict(top_k=-1), 'top_k must be >= 0'),
])
def test_bad_sampling_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _call(decoding.sample, rng=jax.random.key(0), **kwargs)
