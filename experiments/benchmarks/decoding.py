"""Decoding speed of a captioner: greedy decoding with the KV cache against recomputing the
whole sequence at every step.

  python -m experiments.benchmarks.decoding --config=configs/coca_shapes.py
      [--batch=16] [--new_tokens=32] [--runs=5] [--out=decoding.json] [--config.KEY=VALUE]

Both loops are `vlm_jax.inference.decoding.greedy`, compiled end to end (one jit of the
whole `lax.while_loop`), on one device, with random parameters (speed does not depend on
them). The cached step is `CoCa.decode_step` (self-attention keys and values in a
[B, M, H, K] cache, the image context's cross-attention keys and values computed once); the
uncached one is `CoCa.reference_step`, which runs the whole M-token buffer through every
layer at each step, as a model without a cache must under static shapes. The prompt is
[BOS] and EOS is masked out, so every row generates exactly `new_tokens` tokens:
M = new_tokens + 1 (`model.text.max_len` is raised to M when smaller).

Reports, for each: compile time, median seconds of the whole decode (after one warm-up call),
tokens/s (batch * new_tokens / seconds) and ms per step; then the speed-up and whether both
produced the same tokens.
"""
import json
import logging
import sys

from absl import flags

from experiments.benchmarks import timing
from vlm_jax import cli

_CONFIG = cli.define_config_flag()
flags.adopt_module_key_flags(cli)
_BATCH = flags.DEFINE_integer('batch', 16, 'Images decoded together.', lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Tokens generated per image.',
                                   lower_bound=1)
_RUNS = flags.DEFINE_integer('runs', 5, 'Timed decodes (the median is reported).',
                             lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Write the results as flat JSON to this file.')


DEFAULT_VOCAB = 64  # without a built dataset (and its tokenizer)


def benchmark(config, batch: int, new_tokens: int, runs: int) -> dict:
  """The figures of the module docstring, as one flat dict."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vlm_jax.inference import decoding  # pylint: disable=g-import-not-at-top

  max_len = new_tokens + 1
  tokenizer = datasets.tokenizer_if_built(config.data)
  if config.model.text.vocab_size == 0:
    config.model.text.vocab_size = tokenizer.vocab_size if tokenizer else DEFAULT_VOCAB
  config.model.text.max_len = max(config.model.text.max_len or config.data.max_text_len,
                                  max_len)
  bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer else (2, 3)
  model = models.build_model(config.model, text_max_len=config.data.max_text_len)
  if not hasattr(model, 'decode_step'):
    raise cli.UserError(f'model.name={config.model.name!r} does not decode text.')
  device = jax.devices()[0]
  size = config.data.image_size
  images = jax.device_put(
      jax.random.normal(jax.random.key(0), (batch, size, size, 3)), device)
  ids = jnp.zeros((1, config.data.max_text_len), jnp.int32)
  params = jax.device_put(jax.jit(model.init)(jax.random.key(1), images[:1], ids,
                                              jnp.ones_like(ids, bool))['params'], device)
  prompt = jnp.full((batch, 1), bos, jnp.int32)
  prompt_len = jnp.ones((batch,), jnp.int32)

  def decoder(init_method, step_method):
    def decode(params, images):
      def step(cache, tokens):
        logits, cache = model.apply({'params': params}, cache, tokens, method=step_method)
        return logits.at[:, eos].set(-jnp.inf), cache  # always new_tokens tokens
      cache = model.apply({'params': params}, images, max_len, method=init_method)
      return decoding.greedy(step, cache, prompt, prompt_len, max_len=max_len, eos_id=eos,
                             pad_id=0).tokens
    return jax.jit(decode)

  results = {'model': config.model.name, 'device_kind': device.device_kind, 'batch': batch,
             'new_tokens': new_tokens, 'vocab_size': config.model.text.vocab_size}
  tokens = {}
  for name, init_method, step_method in (
      ('cached', model.init_cache, model.decode_step),
      ('uncached', model.init_reference_cache, model.reference_step)):
    start = time.perf_counter()
    compiled = decoder(init_method, step_method).lower(params, images).compile()
    results[f'{name}_compile_s'] = time.perf_counter() - start
    tokens[name] = np.asarray(compiled(params, images))  # warm-up
    seconds = timing.median_seconds(lambda: compiled(params, images).block_until_ready(), runs)
    results[f'{name}_seconds'] = seconds
    results[f'{name}_tokens_per_sec'] = batch * new_tokens / seconds
    results[f'{name}_ms_per_step'] = seconds / new_tokens * 1e3
  results['speedup'] = results['uncached_seconds'] / results['cached_seconds']
  results['same_tokens'] = bool((tokens['cached'] == tokens['uncached']).all())
  return results


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  config = cli.load_config(_CONFIG, sys.argv)
  results = benchmark(config, _BATCH.value, _NEW_TOKENS.value, _RUNS.value)
  width = max(len(k) for k in results)
  for key, value in results.items():
    print(f'{key.ljust(width)}  {value:.4g}' if isinstance(value, float) else
          f'{key.ljust(width)}  {value}')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)
