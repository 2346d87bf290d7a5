"""parallel.cpu_tuning: a jitted program stops page-faulting its temp buffer in at every call."""
import json
import os
import subprocess
import sys

import pytest

from vlm_jax.training import cpu_backend

# Counts the page faults of calls to a program whose temp buffer (~100 MB: cumsum's output
# and the sine beside it) is over the 64 MB that glibc's per-thread heaps can hold.
_PROBE = """
import json, resource, sys
import jax, jax.numpy as jnp
from vlm_jax.training import cpu_backend
kept = cpu_backend.configure(sys.argv[1] == '1')
step = jax.jit(lambda x: (jnp.cumsum(jnp.sin(x), axis=0) * jnp.cos(x)).sum())
x = jnp.linspace(0., 1., 1024 * 8192).reshape(1024, 8192)
compiled = step.lower(x).compile()
values = [float(compiled(x)) for _ in range(2)]
per_call = []  # the median call: one call in a few may meet a heap that something trimmed
for _ in range(5):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  values.append(float(compiled(x)))
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
faults = sorted(per_call)[2]
print(json.dumps(dict(kept=kept, faults=faults, values=values, wait=cpu_backend.wait_for_inputs(),
                      temp=compiled.memory_analysis().temp_size_in_bytes)))
"""


def _run(probe: str, arg: str) -> dict:
  """The JSON line that `probe` prints last, run in a fresh interpreter with `arg`."""
  out = subprocess.run([sys.executable, '-c', probe, arg], capture_output=True, text=True,
                       timeout=300, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_tuned_calls_reuse_their_temp_buffer():
  tuned, default = _run(_PROBE, '1'), _run(_PROBE, '0')
  assert tuned['temp'] > 64 * 2 ** 20
  assert tuned['kept'] and not default['kept']
  assert tuned['wait'] and not default['wait']  # the train loop waits for its batches
  assert tuned['values'] == default['values']  # the same program, the same results
  pages = tuned['temp'] / 4096
  if default['faults'] < 0.25 * pages:
    pytest.skip(f'this kernel faults the untuned buffer in as huge pages '
                f'({default["faults"]} faults per call): nothing to compare')
  assert tuned['faults'] < 0.01 * pages, (tuned, default)


def test_disabled_changes_nothing():
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.read('jax_cpu_enable_async_dispatch')
  assert cpu_backend.configure(False) is False
  assert jax.config.read('jax_cpu_enable_async_dispatch') == before


def test_config_default_is_on():
  from vlm_jax.defaults import base_config  # pylint: disable=g-import-not-at-top
  assert base_config().parallel.cpu_tuning is True


# After many parsed records, does a freed 100 MB block of the main heap (XLA's temp buffer
# between two steps) still hold its pages? protobuf trims the heap every 10,000 freed blocks.
_TRIM_PROBE = """
import ctypes, json, resource, sys
from tensorflow_datasets.proto import tf_example_pb2
from vlm_jax.data import records
from vlm_jax.training import cpu_backend
cpu_backend.keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 100 << 20
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
example = tf_example_pb2.Example()
for k in range(12):
  example.features.feature[f'f{k}'].bytes_list.value.append(b'x' * 100)
batch = [example.SerializeToString()] * 128
for _ in range(200):  # 25,600 records
  if sys.argv[1] == 'each':
    for features in records.parse_each(batch):
      len(features['f0'].bytes_list.value[0])
  else:
    for record in batch:
      len(records.parse(record)['f0'].bytes_list.value[0])
block = libc.malloc(size)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(block, 2, size)
print(json.dumps({'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start}))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_parsing_records_leaves_freed_memory_in_place():
  pages = (100 << 20) / 4096
  one_by_one = _run(_TRIM_PROBE, 'one_by_one')['faults']
  if one_by_one < 0.25 * pages:
    pytest.skip(f'protobuf did not trim the heap here ({one_by_one} faults): nothing to compare')
  assert _run(_TRIM_PROBE, 'each')['faults'] < 0.01 * pages
