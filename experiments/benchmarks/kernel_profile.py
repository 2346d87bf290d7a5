"""A `jax.profiler` trace of a few train steps, and the XLA kernels that took the most time.

Used by `python -m experiments.benchmarks.run ... --profile_dir=DIR`, which prints the
slowest kernels of the trace. The trace (`DIR/plugins/profile/*/*.xplane.pb`) opens in
TensorBoard's profile plugin (xprof); `DIR/train_step.hlo.txt` holds the compiled step, so
that a kernel's name (`ynn_fusion.12`, `dot.3`, `multiply_add_fusion.40`) leads to its HLO:
its operands, shapes and, in its `op_name` metadata, the model code that made it.
"""
import collections
import glob
import os
import re
from typing import Any, Callable

# XLA:CPU records one trace event per kernel (thunk) only with this flag.
CPU_KERNEL_EVENTS = '--xla_cpu_enable_xprof_traceme=true'
HLO_FILE = 'train_step.hlo.txt'


def enable_cpu_kernel_events() -> None:
  """Adds `CPU_KERNEL_EVENTS` to XLA_FLAGS; call before JAX starts its CPU backend."""
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_KERNEL_EVENTS not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_KERNEL_EVENTS}'.strip()


def instructions(hlo_text: str) -> dict[str, str]:
  """{name: 'shape  op_name'} of the instructions of an HLO module's text, the op_name (the
  JAX operation the instruction comes from) shortened to its last three parts."""
  out = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      where = '/'.join(op_name.group(1).split('/')[-3:]) if op_name else ''
      out[match.group(1)] = f'{match.group(2).split("{")[0]}  {where}'.strip()
  return out


def kernel_times(events, kernels, steps: int) -> list[tuple[str, float, float]]:
  """[(kernel, calls per step, ms per step)], slowest first, from (name, duration in ns)
  events; names not in `kernels` (runtime and Python events) are left out."""
  total_ns, calls = collections.Counter(), collections.Counter()
  for name, duration_ns in events:
    if name in kernels:
      total_ns[name] += duration_ns
      calls[name] += 1
  return [(name, calls[name] / steps, ns / 1e6 / steps) for name, ns in total_ns.most_common()]


def trace_steps(step: Callable[[], Any], steps: int, directory: str,
                hlo_text: str) -> list[tuple[str, float, float]]:
  """Traces `steps` calls of `step` (each blocking until done) into `directory`, writes the
  compiled HLO beside the trace, and returns `kernel_times` of the trace.

  Kernels that run concurrently (on CPU, XLA runs independent ones on its thread pool)
  overlap, so their times can add up to more than the step's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, HLO_FILE), 'w') as f:
    f.write(hlo_text)
  before = set(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True))
  jax.profiler.start_trace(directory)
  try:
    for _ in range(steps):
      step()
  finally:
    jax.profiler.stop_trace()
  traces = set(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True))
  if not traces - before:
    raise RuntimeError(f'jax.profiler wrote no trace under {directory!r}.')
  data = jax.profiler.ProfileData.from_file(max(traces - before, key=os.path.getmtime))
  events = ((event.name, event.duration_ns) for plane in data.planes
            for line in plane.lines for event in line.events)
  return kernel_times(events, instructions(hlo_text), steps)


def kernel_table(kernels: list[tuple[str, float, float]], step_ms: float, top: int,
                 hlo_text: str = '') -> str:
  """The `top` slowest kernels as a text table, with their share of the step's time and,
  from `hlo_text`, their output shape and the JAX operation they come from."""
  if not kernels:
    return 'No kernel events in the trace.'
  about = instructions(hlo_text)
  lines = [f'{"kernel":<28}  {"calls/step":>10}  {"ms/step":>9}  {"of step":>7}  output, origin']
  for name, calls, ms in kernels[:top]:
    lines.append(f'{name:<28}  {calls:>10.0f}  {ms:>9.2f}  {ms / step_ms:>7.1%}  '
                 f'{about.get(name, "")[:90]}')
  total = sum(ms for _, _, ms in kernels)
  lines.append(f'{"all " + str(len(kernels)) + " kernels":<28}  {"":>10}  {total:>9.2f}  '
               f'{total / step_ms:>7.1%}')
  return '\n'.join(lines)
