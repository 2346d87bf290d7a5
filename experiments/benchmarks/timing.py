"""Timing helpers of the benchmarks: interleaved step times and paired speed-ups.

Kept apart from `run.py`, which defines absl flags on import, so tests can import them.
"""
import statistics
import time
from typing import Any, Callable, Sequence


def interleaved_seconds(fns: Sequence[Callable[[], Any]], runs: int,
                        clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
  """Wall times of `runs` rounds that each call every fn of `fns` once, in turn.

  Returns times[i][r], the time of `fns[i]` in round r (each fn must block until its work is
  done). Alternating step by step exposes all fns to the same load at about the same time.
  """
  if not fns or runs < 1:
    raise ValueError(f'interleaved_seconds needs fns and runs >= 1; got {len(fns)} fns, '
                     f'runs={runs}.')
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(runs):
    for fn, fn_times in zip(fns, times):
      start = clock()
      fn()
      fn_times.append(clock() - start)
  return times


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
  """Median wall time of `runs` calls of `fn` (which must block until its work is done)."""
  return statistics.median(interleaved_seconds([fn], runs)[0])


def pair_speedups(jax_seconds: Sequence[float], torch_seconds: Sequence[float]) -> dict:
  """speedup_vs_torch(_min, _max): median (min, max) of torch_i / jax_i over paired steps."""
  if len(jax_seconds) != len(torch_seconds) or not jax_seconds:
    raise ValueError(f'pair_speedups needs as many JAX as torch step times (>= 1); got '
                     f'{len(jax_seconds)} and {len(torch_seconds)}.')
  if min(*jax_seconds, *torch_seconds) <= 0:
    raise ValueError(f'Step times must be positive; got JAX {list(jax_seconds)}, '
                     f'torch {list(torch_seconds)}.')
  ratios = [t / j for j, t in zip(jax_seconds, torch_seconds)]
  return {'speedup_vs_torch': statistics.median(ratios),
          'speedup_vs_torch_min': min(ratios), 'speedup_vs_torch_max': max(ratios)}


def torch_metrics(jax_seconds: Sequence[float], torch_seconds: Sequence[float] | None,
                  torch_batch: int | None) -> dict:
  """torch_examples_per_sec (batch / median torch time) and `pair_speedups`; nulls: no peer."""
  if torch_seconds is None:
    return {'torch_examples_per_sec': None, 'speedup_vs_torch': None,
            'speedup_vs_torch_min': None, 'speedup_vs_torch_max': None}
  return {'torch_examples_per_sec': torch_batch / statistics.median(torch_seconds),
          **pair_speedups(jax_seconds, torch_seconds)}
