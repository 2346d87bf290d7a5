"""Smoke test of the benchmark entry point on the `tiny` config (no timing assertions), and
the interleaved timing / paired speed-up helpers on hand-made timings."""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from experiments.benchmarks import kernel_profile, timing
from run_configs import tiny_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ('examples_per_sec', 'step_time_ms', 'compile_time_s', 'model_tflops_per_step',
            'analytic_tflops_per_step', 'measured_ceiling_tflops', 'mfu_vs_measured_ceiling',
            'peak_memory_bytes', 'pipeline_examples_per_sec', 'pipeline_vs_step_ratio',
            'eval_embed_images_per_sec')
NULLABLE = ('mfu_vs_peak', 'torch_examples_per_sec', 'speedup_vs_torch', 'speedup_vs_torch_min',
            'speedup_vs_torch_max')
HAS_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))


def test_benchmark_writes_every_metric(shapes_small_dir, tmp_path):
  out = tmp_path / 'bench.json'
  command = [sys.executable, '-m', 'experiments.benchmarks.run',
             '--config=configs/clip_shapes.py:tiny', '--steps=2', '--warmup=1',
             '--matmul_size=512', f'--config.data.data_dir={shapes_small_dir}', f'--out={out}',
             f'--profile_dir={tmp_path / "profile"}']
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'examples_per_sec' in result.stdout
  # The profile: a trace, the compiled HLO, and a table of kernels named in that HLO.
  assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  hlo = (tmp_path / 'profile' / kernel_profile.HLO_FILE).read_text()
  table = result.stdout.split('Slowest XLA kernels')[1].splitlines()[2:]
  assert table and table[0].split()[0] in kernel_profile.instructions(hlo), table[:3]
  metrics = json.load(open(out))
  for key in POSITIVE:
    assert isinstance(metrics[key], (int, float)) and metrics[key] > 0, (key, metrics[key])
  for key in NULLABLE:
    assert metrics[key] is None or metrics[key] > 0, (key, metrics[key])
  if metrics['torch_examples_per_sec'] is None:
    assert 'PyTorch peer skipped' in result.stdout
  if HAS_TORCH:  # the peer ran, alternating with the JAX steps
    low, mid, high = (metrics[f'speedup_vs_torch{s}'] for s in ('_min', '', '_max'))
    assert math.isfinite(mid) and 0 < low <= mid <= high, (low, mid, high)
    assert metrics['torch_examples_per_sec'] > 0
  if metrics['backend'] == 'cpu':
    assert metrics['mfu_vs_peak'] is None


def test_help_describes_every_flag():
  result = subprocess.run([sys.executable, '-m', 'experiments.benchmarks.run', '--help'],
                          cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True,
                          text=True, timeout=60)
  for flag in ('--config', '--out', '--steps', '--warmup', '--torch', '--matmul_size',
               '--profile_dir'):
    assert flag in result.stdout + result.stderr, flag


def test_kernel_times_and_table_from_hand_made_events():
  hlo = ('ENTRY %main {\n'
         '  %dot.1 = f32[8,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/m/fc1/dot_general"}\n'
         '  ROOT %add_fusion.2 = f32[8,4]{1,0} fusion(%dot.1), kind=kLoop\n}')
  kernels = kernel_profile.instructions(hlo)
  assert kernels == {'dot.1': 'f32[8,4]  m/fc1/dot_general', 'add_fusion.2': 'f32[8,4]'}
  events = [('dot.1', 3e6), ('add_fusion.2', 1e6), ('dot.1', 5e6), ('PjitFunction', 9e6)]
  times = kernel_profile.kernel_times(events, kernels, steps=2)
  assert times == [('dot.1', 1.0, 4.0), ('add_fusion.2', 0.5, 0.5)]  # per step, slowest first
  table = kernel_profile.kernel_table(times, step_ms=10.0, top=1, hlo_text=hlo)
  assert 'dot.1' in table and '40.0%' in table and 'm/fc1/dot_general' in table
  assert 'add_fusion.2' not in table and 'all 2 kernels' in table and '45.0%' in table
  assert kernel_profile.kernel_table([], 1.0, 5) == 'No kernel events in the trace.'


def test_pair_speedups_is_the_median_of_pair_ratios():
  jax_s, torch_s = [1.0, 2.0, 4.0, 1.0], [3.0, 2.0, 8.0, 4.0]  # ratios 3, 1, 2, 4
  out = timing.pair_speedups(jax_s, torch_s)
  assert out == {'speedup_vs_torch': 2.5, 'speedup_vs_torch_min': 1.0,
                 'speedup_vs_torch_max': 4.0}
  # The ratio of the medians, 3.5 / 1.5, would differ.
  assert abs(out['speedup_vs_torch'] - 3.5 / 1.5) > 0.1


@pytest.mark.parametrize('jax_s, torch_s', [
    ([], []), ([1.0], [1.0, 2.0]), ([1.0, 0.0], [1.0, 1.0]), ([1.0], [-1.0])])
def test_pair_speedups_rejects_bad_timings(jax_s, torch_s):
  with pytest.raises(ValueError, match='JAX'):
    timing.pair_speedups(jax_s, torch_s)


def test_interleaved_seconds_alternates_and_times_each_call():
  now, calls = [0.0], []

  def clock():
    return now[0]

  def make(name, seconds):
    def fn():
      calls.append(name)
      now[0] += seconds
    return fn

  times = timing.interleaved_seconds([make('jax', 1.0), make('torch', 5.0)], 3, clock)
  assert calls == ['jax', 'torch'] * 3
  assert times == [[1.0] * 3, [5.0] * 3]
  with pytest.raises(ValueError, match='runs'):
    timing.interleaved_seconds([make('jax', 1.0)], 0, clock)


def test_torch_metrics():
  out = timing.torch_metrics([1.0, 2.0, 4.0], [2.0, 2.0, 12.0], torch_batch=16)
  assert out['torch_examples_per_sec'] == 16 / 2.0  # batch / median torch time
  assert out['speedup_vs_torch'] == 2.0 and out['speedup_vs_torch_max'] == 3.0
  assert set(timing.torch_metrics([1.0], None, None).values()) == {None}


@pytest.mark.skipif(not HAS_TORCH, reason='torch/transformers not installed')
def test_torch_peer_step_on_tiny_config(tmp_path):
  from experiments.benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  config = tiny_config(str(tmp_path))
  step, batch = torch_peer.build_step(config, vocab_size=16)
  assert batch == config.train.batch_size
  assert step() is None
  assert torch_peer.examples_per_sec(config, 16, steps=1, warmup=0) > 0


@pytest.mark.parametrize('overrides', [{}, {'image.pool': 'gap'}, {'text.pool': 'mean'}])
def test_analytic_flops_match_xla_count_of_the_step(overrides):
  """`analytic_flops` (with and without the pooled-row last blocks) against XLA's count of
  the compiled train step of the default model, whose FLOPs are nearly all matmuls. (XLA
  counts a scanned loop's body once, so scanned layers cannot be checked this way.)"""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import clip_shapes  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import run  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import partitioning, trainer  # pylint: disable=g-import-not-at-top
  config = clip_shapes.get_config()
  config.train.batch_size, config.model.text.vocab_size = 16, 64
  for key, value in overrides.items():
    config.model.update_from_flattened_dict({key: value})
  run.single_device_config(config)
  setup = trainer.Setup(config, mesh=partitioning.make_mesh(config.parallel,
                                                            jax.devices()[:1]))
  state = setup.init_state(jax.random.key(0))
  batch = setup.device_batch(run.synthetic_batch(config, 64))
  with jax.set_mesh(setup.mesh):
    compiled = setup.train_step.lower(state, batch, jax.random.key(1)).compile()
  ratio = run._flops_of(compiled) / run.analytic_flops(config, 16)
  assert 0.99 < ratio < 1.04, ratio
