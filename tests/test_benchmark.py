"""Smoke test of the benchmark entry point on the `tiny` config (no timing assertions)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ('examples_per_sec', 'step_time_ms', 'compile_time_s', 'model_tflops_per_step',
            'analytic_tflops_per_step', 'measured_ceiling_tflops', 'mfu_vs_measured_ceiling',
            'peak_memory_bytes', 'pipeline_examples_per_sec', 'pipeline_vs_step_ratio',
            'eval_embed_images_per_sec')
NULLABLE = ('mfu_vs_peak', 'torch_examples_per_sec', 'speedup_vs_torch')


def test_benchmark_writes_every_metric(shapes_small_dir, tmp_path):
  out = tmp_path / 'bench.json'
  command = [sys.executable, '-m', 'experiments.benchmarks.run',
             '--config=configs/clip_shapes.py:tiny', '--steps=2', '--warmup=1',
             '--matmul_size=512', f'--config.data.data_dir={shapes_small_dir}', f'--out={out}']
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'examples_per_sec' in result.stdout
  metrics = json.load(open(out))
  for key in POSITIVE:
    assert isinstance(metrics[key], (int, float)) and metrics[key] > 0, (key, metrics[key])
  for key in NULLABLE:
    assert metrics[key] is None or metrics[key] > 0, (key, metrics[key])
  if metrics['torch_examples_per_sec'] is None:
    assert 'PyTorch peer skipped' in result.stdout
  if metrics['backend'] == 'cpu':
    assert metrics['mfu_vs_peak'] is None


def test_help_describes_every_flag():
  result = subprocess.run([sys.executable, '-m', 'experiments.benchmarks.run', '--help'],
                          cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True,
                          text=True, timeout=60)
  for flag in ('--config', '--out', '--steps', '--warmup', '--torch', '--matmul_size'):
    assert flag in result.stdout + result.stderr, flag
