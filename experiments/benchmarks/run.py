"""Train-step throughput, FLOPs, MFU, memory, input pipeline and eval speed of a config.

  python -m experiments.benchmarks.run --config=configs/clip_shapes.py[:VARIANT]
      [--out=bench.json] [--steps=20] [--warmup=3] [--torch=auto|off] [--profile_dir=DIR]
      [--config.KEY=VALUE]

Everything runs on one device (`jax.devices()[0]`, mesh data=1, `parallel.mode='jit'`), on
synthetic batches of the config's shapes, except `pipeline_examples_per_sec`, which reads the
real train stream (the dataset is built on first use, as training would). Prints a table and
writes the numbers as one flat JSON object (`--out`). Like `vlm_jax.train`, it applies
`parallel.cpu_tuning` (vlm_jax/training/cpu_backend.py: synchronous CPU dispatch, host memory
kept between steps) before JAX starts; the PyTorch peer runs in the same process and so
shares the malloc settings.

Metrics:
  step_time_ms: median over `--steps` steps after `--warmup` steps, each timed to
    `block_until_ready`; examples_per_sec = batch / median step time. With the PyTorch peer
    the timed steps alternate with its steps (see below); both are warmed up first.
  compile_time_s: lowering plus compiling the train step.
  model_tflops_per_step: XLA's count (`compiled.cost_analysis()['flops']`) of the step; it
    counts a loop body once, so with `model.scan_layers` it is that of one layer per tower.
  analytic_tflops_per_step: see `analytic_flops`.
  measured_ceiling_tflops: a jitted [n, n] @ [n, n] matmul of model-dtype inputs on the same
    device, accumulated in float32 like the model's (2 n^3 FLOPs), run once in each timed
    round after the step(s), so that it sees the same machine load; median of the rounds.
  mfu_vs_measured_ceiling, mfu_vs_peak: analytic TFLOP/s achieved by the step over the
    measured ceiling, and over the device's dense bf16 peak (`PEAK_TFLOPS`; null on CPU).
  peak_memory_bytes: compiled temp + argument + output bytes of the step (also reported
    apart), and `device_peak_bytes_in_use` from `device.memory_stats()` where available.
  pipeline_examples_per_sec: batch size over the median time of reading one batch of the
    train dataset on one thread (`pipeline_reader`: what the train iterator's worker does
    per batch), one batch per timed round, beside the steps; pipeline_vs_step_ratio is it
    over examples_per_sec (> 1: the input pipeline keeps up with training).
  eval_embed_images_per_sec: `Embedder.images` on synthetic images, eval batch size.
  torch_examples_per_sec: the PyTorch peer (`torch_peer.py`), batch / median of its step
    times, or null. Its `--steps` timed steps alternate with the JAX ones (JAX, torch, JAX,
    torch...), so each pair runs under the same machine load.
  speedup_vs_torch: median over the pairs of torch step time / JAX step time (so load that
    drifts during the run cancels out in each ratio); speedup_vs_torch_min and _max are the
    smallest and largest pair ratio (their spread shows how noisy the figure is). Null
    without the peer.
"""
import json
import logging
import math
import statistics
import sys
import time
from typing import Any, Callable

from absl import flags

from experiments.benchmarks import kernel_profile, timing
from vlm_jax import cli
from vlm_jax.training import cpu_backend

_CONFIG = cli.define_config_flag()
flags.adopt_module_key_flags(cli)  # `--help` lists --config too
_OUT = flags.DEFINE_string('out', None, 'Write the results as flat JSON to this file.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed train steps (the median is reported).',
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed train steps before timing (after '
                               'compiling).', lower_bound=0)
_TORCH = flags.DEFINE_enum('torch', 'auto', ['auto', 'off'],
                           "PyTorch peer: 'auto' runs it when torch and transformers import; "
                           "'off' skips it.")
_MATMUL = flags.DEFINE_integer('matmul_size', 0, 'Side n of the square matmul that measures '
                               'the ceiling; 0 = 2048 on CPU, 8192 on accelerators.',
                               lower_bound=0)
_PIPELINE = flags.DEFINE_bool('pipeline', True, 'Measure the input pipeline (builds the '
                              'dataset if it is not built yet).')
_PROFILE = flags.DEFINE_string('profile_dir', None, 'Also trace 3 train steps with '
                               'jax.profiler into this folder (with the compiled HLO) and '
                               'print the slowest XLA kernels.')
PROFILE_STEPS = 3

DEFAULT_VOCAB = 64
# Dense bf16 peak TFLOP/s by `device_kind` prefix (lower case), from the vendors' data sheets.
PEAK_TFLOPS = (
    ('nvidia h100', 989.0),   # SXM; the PCIe card is lower (756)
    ('nvidia h200', 989.0),
    ('nvidia a100', 312.0),
    ('tpu v4', 275.0),
    ('tpu v5 lite', 197.0),   # v5e
    ('tpu v5e', 197.0),
    ('tpu v5p', 459.0),
    ('tpu v5', 459.0),        # 'TPU v5' is how v5p reports itself
)
TORCH_SKIP = ('PyTorch peer skipped: torch/transformers not installed '
              '(pip install torch==2.13.0 transformers)')


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind, or None when unknown (CPUs)."""
  kind = device_kind.lower()
  for prefix, peak in PEAK_TFLOPS:
    if kind.startswith(prefix):
      return peak
  return None


def _tower_flops(tower, batch_size: int, tokens: int, pooled_row_only: bool) -> float:
  """Training FLOPs of one transformer tower's blocks (see `analytic_flops`)."""
  d, mlp, depth = tower.width, tower.mlp_dim, tower.depth
  flops = 6 * depth * (4 * d ** 2 + 2 * d * mlp) * batch_size * tokens
  flops += 12 * depth * batch_size * tokens ** 2 * d
  if pooled_row_only and depth:
    # The last block's query, output and MLP weights and its scores skip T - 1 rows.
    flops -= 6 * (2 * d ** 2 + 2 * d * mlp) * batch_size * (tokens - 1)
    flops -= 12 * batch_size * tokens * (tokens - 1) * d
  return flops


def analytic_flops(config, batch_size: int) -> float:
  """Training FLOPs of one step of a dual encoder, by the usual transformer count.

  Per tower with T tokens per example, width d, depth l:
    6 * N * B * T          matmul weights N (a multiply-add is 2 FLOPs; backward is twice
                           the forward): l (4 d^2 + 2 d mlp) attention and MLP weights;
    + 12 * l * B * T^2 * d attention scores and their weighted sum (2 * 2 T^2 d forward).
  The image tower adds its patch embedding (3 p^2 d weights over (S/p)^2 patches) and has
  T = (S/p)^2 + 1 tokens with a class token; the text tower has T = max_text_len (the causal
  mask is counted as full attention, as it is computed). A tower that pools one token
  (image 'cls', text 'eot', 'cls' or 'last') computes the last block's query, attention
  output and MLP for that row alone (`vlm_jax.nn.transformer.Encoder`'s `rows`; not with
  scanned layers), so its count for them is of one row, not T. Each projection adds
  6 * B * d * E, the contrastive logits 6 * B^2 * E. Embedding lookups, layer norms,
  activations, softmaxes and a MAP pooling head are not counted.
  """
  model, data = config.model, config.data
  image, text, embed = model.image, model.text, model.embed_dim
  patches = (data.image_size // image.patch_size) ** 2
  image_tokens = patches + (1 if image.pool == 'cls' else 0)
  text_tokens = data.max_text_len
  pooled_rows = (not model.scan_layers and image.pool == 'cls',
                 not model.scan_layers and text.pool in ('eot', 'cls', 'last'))
  flops = 0.0
  for tower, tokens, pooled_row_only in zip((image, text), (image_tokens, text_tokens),
                                            pooled_rows):
    flops += _tower_flops(tower, batch_size, tokens, pooled_row_only)
    flops += 6 * batch_size * tower.width * embed
  flops += 6 * 3 * image.patch_size ** 2 * image.width * batch_size * patches
  flops += 6 * batch_size ** 2 * embed
  return flops


def _jnp_dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(name)


def ceiling_matmul(device, dtype: str, size: int) -> tuple[Callable[[], Any], float]:
  """(a call that runs a jitted [size, size] @ [size, size] matmul of `dtype` inputs on
  `device` and blocks until it is done, its FLOPs); compiled and run once already."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), _jnp_dtype(dtype)), device)
          for k in keys)
  # As the model's products (vlm_jax.nn.ops.einsum): accumulated in float32, which XLA's CPU
  # backend runs 2-4x faster in bf16 than a bf16 -> bf16 dot.
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  run = lambda: matmul(a, b).block_until_ready()
  run()  # compile
  return run, 2.0 * size ** 3


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """A host batch of the config's shapes: normal images, random ids, full masks."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  batch, size, length = config.train.batch_size, config.data.image_size, config.data.max_text_len
  out = {'image': rng.standard_normal((batch, size, size, 3), np.float32),
         'text_ids': rng.integers(1, vocab_size, (batch, length), dtype=np.int32),
         'text_mask': np.ones((batch, length), bool)}
  if config.data.vqa:  # captioners: question-answer rows, loss on the second half
    out.update(vqa_ids=rng.integers(1, vocab_size, (batch, length), dtype=np.int32),
               vqa_mask=np.ones((batch, length), bool),
               vqa_loss_mask=np.broadcast_to(np.arange(length) >= length // 2, (batch, length)))
  return out


def pipeline_reader(config) -> tuple[Callable[[], Any] | None, Any]:
  """(a call that reads the next batch of the train dataset on the calling thread, the
  tokenizer), or (None, None) when the dataset cannot be built; builds it on first use.

  A call runs what the train iterator's worker runs per batch (`pipeline.make_train_dataset`
  element: records read, decoded, augmented, normalised, tokenised), without grain's
  prefetch threads, so that it can be timed in the same rounds as the step.
  """
  from vlm_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  try:
    datasets.ensure_built(config.data)
  except (OSError, ValueError) as e:
    logging.warning('Pipeline not measured, the dataset could not be built: %s', e)
    return None, None
  tokenizer = datasets.load_tokenizer(config.data)
  dataset = pipeline.make_train_dataset(config.data, tokenizer, config.train.batch_size,
                                        seed=config.seed)
  index = iter(range(len(dataset)))
  read = lambda: dataset[next(index)]
  read()  # opens the record files
  return read, tokenizer


def single_device_config(config) -> None:
  """Points `config` at one device: mesh data=1, 'jit' mode."""
  config.parallel.mode = 'jit'
  config.parallel.mesh.update(dict(data=1, fsdp=1, tensor=1))


def _flops_of(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (a dict, or a list of one per program)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def _memory_of(compiled) -> dict:
  """Compiled temp / argument / output bytes and their sum."""
  memory = compiled.memory_analysis()
  if memory is None:
    return {'peak_memory_bytes': None}
  parts = {'temp_bytes': int(memory.temp_size_in_bytes),
           'argument_bytes': int(memory.argument_size_in_bytes),
           'output_bytes': int(memory.output_size_in_bytes)}
  return {'peak_memory_bytes': sum(parts.values()), **parts}


def measure_step(config, vocab_size: int, steps: int, warmup: int,
                 peer: Callable[[], Any] | None = None, ceiling_size: int = 0,
                 profile_dir: str | None = None, read_batch: Callable[[], Any] | None = None
                 ) -> tuple[dict, Any, Any, list[float], list[float] | None]:
  """Compiles and times the train step on one device.

  With `peer` (a step that blocks until done), each warm-up and timed step of JAX is followed
  by one of `peer`. With `ceiling_size`, each timed round then runs the ceiling matmul
  (`ceiling_matmul`), so that the ceiling is measured under the same load as the step
  (`measured_ceiling_tflops`, median of the rounds), and with `read_batch` (see
  `pipeline_reader`) reads one input batch (`pipeline_examples_per_sec`, batch size over the
  median of the rounds; None without it). With `profile_dir`, `PROFILE_STEPS`
  more steps are traced there and the slowest kernels printed (`kernel_profile`). Returns
  (metrics, setup, params, JAX step times, peer step times or None).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import partitioning, trainer  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  setup = trainer.Setup(config, mesh=partitioning.make_mesh(config.parallel, [device]))
  state = setup.init_state(jax.random.key(config.seed))
  batch = setup.device_batch(synthetic_batch(config, vocab_size))
  rng = jax.random.key(1)
  start = time.perf_counter()
  with jax.set_mesh(setup.mesh):
    compiled = setup.train_step.lower(state, batch, rng).compile()
  compile_time = time.perf_counter() - start

  def one_step():
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))

  fns = [one_step] if peer is None else [one_step, peer]
  for _ in range(warmup):
    for fn in fns:
      fn()
  ceiling = None
  if ceiling_size:
    ceiling, ceiling_flops = ceiling_matmul(device, config.model.dtype, ceiling_size)
  if read_batch is not None:
    read_batch()  # a warm-up read beside the warm-up steps
  extras = [fn for fn in (ceiling, read_batch) if fn is not None]
  times = timing.interleaved_seconds(fns + extras, steps)
  extra_times = dict(zip(extras, times[len(fns):]))
  step_time = statistics.median(times[0])
  if profile_dir:
    hlo = compiled.as_text()
    kernels = kernel_profile.trace_steps(one_step, PROFILE_STEPS, profile_dir, hlo)
    print(f'Slowest XLA kernels of the train step (trace and HLO in {profile_dir}):')
    print(kernel_profile.kernel_table(kernels, step_time * 1e3, top=20, hlo_text=hlo))
  flops = _flops_of(compiled)
  stats = device.memory_stats() or {}
  metrics = {
      'num_params': setup.num_params,
      'step_time_ms': step_time * 1e3,
      'examples_per_sec': config.train.batch_size / step_time,
      'compile_time_s': compile_time,
      'model_tflops_per_step': flops / 1e12 if flops else None,
      **_memory_of(compiled),
      'device_peak_bytes_in_use': stats.get('peak_bytes_in_use'),
  }
  if ceiling:
    metrics['matmul_size'] = ceiling_size
    metrics['measured_ceiling_tflops'] = (
        ceiling_flops / statistics.median(extra_times[ceiling]) / 1e12)
  metrics['pipeline_examples_per_sec'] = (
      config.train.batch_size / statistics.median(extra_times[read_batch])
      if read_batch is not None else None)
  return metrics, setup, state.params, times[0], (times[1] if peer is not None else None)


def measure_embed(config, model, params, images: int, runs: int = 3) -> float:
  """Images/s of `Embedder.images` on `images` synthetic images (after one compiling call)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top
  embedder = runner.Embedder(model, params, None, config.data.max_text_len,
                             config.eval.batch_size)
  size = config.data.image_size
  pixels = np.random.default_rng(0).standard_normal((images, size, size, 3), np.float32)
  embedder.images(pixels[:embedder.batch_size])  # compile
  return images / timing.median_seconds(lambda: embedder.images(pixels), runs)


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def torch_peer_step(config, vocab_size: int,
                    mode: str) -> tuple[Callable[[], None], int] | None:
  """The PyTorch peer's (step, batch size), or None (and a printed reason) when it is off."""
  if mode not in ('auto', 'off'):
    raise ValueError(f"torch mode must be 'auto' or 'off'; got {mode!r}.")
  if mode == 'off':
    print('PyTorch peer skipped: --torch=off')
    return None
  from experiments.benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  if not torch_peer.available():
    print(TORCH_SKIP)
    return None
  return torch_peer.build_step(config, vocab_size)


def benchmark(config, steps: int, warmup: int, torch_mode: str = 'auto', matmul_size: int = 0,
              with_pipeline: bool = True, profile_dir: str | None = None) -> dict:
  """All the metrics of the module docstring for `config`, as one flat dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  single_device_config(config)
  device = jax.devices()[0]
  read_batch, tokenizer = pipeline_reader(config) if with_pipeline else (None, None)
  tokenizer = tokenizer or datasets.tokenizer_if_built(config.data)
  if tokenizer is not None:
    trainer.resolve_config(config, tokenizer)
  elif config.model.text.vocab_size == 0:
    config.model.text.vocab_size = DEFAULT_VOCAB
  vocab = config.model.text.vocab_size
  results: dict[str, Any] = {
      'config': config.model.name, 'device_kind': device.device_kind,
      'backend': jax.default_backend(), 'batch_size': config.train.batch_size,
      'dtype': config.model.dtype, 'vocab_size': vocab, 'steps': steps, 'warmup': warmup,
      'cpu_tuning': config.parallel.cpu_tuning}
  peer = torch_peer_step(config, vocab, torch_mode)
  size = matmul_size or (2048 if jax.default_backend() == 'cpu' else 8192)
  step_metrics, setup, params, jax_seconds, torch_seconds = measure_step(
      config, vocab, steps, warmup, peer[0] if peer else None, ceiling_size=size,
      profile_dir=profile_dir, read_batch=read_batch)
  results.update(step_metrics)
  analytic = analytic_flops(config, config.train.batch_size)
  results['analytic_tflops_per_step'] = analytic / 1e12
  achieved = analytic / 1e12 / (results['step_time_ms'] / 1e3)
  results['achieved_analytic_tflops'] = achieved
  results['mfu_vs_measured_ceiling'] = _ratio(achieved, results['measured_ceiling_tflops'])
  results['peak_tflops'] = peak_tflops(device.device_kind)
  results['mfu_vs_peak'] = _ratio(achieved, results['peak_tflops'])
  results['pipeline_vs_step_ratio'] = _ratio(results['pipeline_examples_per_sec'],
                                              results['examples_per_sec'])
  results['eval_embed_images_per_sec'] = measure_embed(
      config, setup.model, params, 2 * config.eval.batch_size)
  results.update(timing.torch_metrics(jax_seconds, torch_seconds, peer[1] if peer else None))
  return results


def _format(value: Any) -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e5 else f'{value:,.0f}'
  if isinstance(value, int) and not isinstance(value, bool):
    return f'{value:,}'
  return str(value)


def table(results: dict) -> str:
  """The results as a two-column text table."""
  width = max(len(k) for k in results)
  lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  {"-" * 12}']
  lines += [f'{k.ljust(width)}  {_format(v)}' for k, v in results.items()]
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  config = cli.load_config(_CONFIG, sys.argv)
  cpu_backend.configure(config.parallel.cpu_tuning)  # as vlm_jax.train does
  if _PROFILE.value:
    kernel_profile.enable_cpu_kernel_events()
  results = benchmark(config, _STEPS.value, _WARMUP.value, _TORCH.value, _MATMUL.value,
                      _PIPELINE.value, _PROFILE.value)
  results = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in results.items()}
  print(table(results))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)
