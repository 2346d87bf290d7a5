"""Settings that make jitted steps faster on JAX's CPU backend (`parallel.cpu_tuning`).

XLA's CPU runtime allocates one temporary buffer per execution (the step's activations,
`compiled.memory_analysis().temp_size_in_bytes`: 127 MB for `clip_shapes.py`, 2.3 GB for its
`bench` variant) with malloc and frees it at the end. glibc serves a block that large with a
fresh `mmap` and returns it with `munmap`, so every step page-faults its whole temp buffer in
again and the kernel zeroes it: measured on a 2-core Xeon, 31,500 page faults and 53 ms of
system time per `clip_shapes.py` step of 104 ms.

`configure` stops that in two parts, both needed:
  - synchronous dispatch (`jax_cpu_enable_async_dispatch=False`): the step executes on the
    calling thread, whose allocations come from glibc's main heap; with asynchronous dispatch
    they happen on worker threads whose heaps cannot hold blocks over 64 MB and fall back to
    mmap whatever the settings. A step whose inputs are still being copied to the device
    is deferred to a worker thread all the same, so `trainer.Setup.device_batch` waits for
    each batch's copy (`wait_for_inputs`);
  - `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, -1)`: the main heap serves every
    block and keeps what is freed, so the next step reuses the same pages. An explicit
    `malloc_trim` still hands them back: protobuf's parser calls one every 10,000 freed
    blocks, which is why the input pipeline parses records into one reused message
    (`vlm_jax.data.records.parse_each`).
The process then keeps its peak host memory instead of handing it back between steps (as
a GPU framework's caching allocator keeps device memory). Dispatch must be chosen before
JAX creates its CPU client: call `configure` before the first computation or
`jax.devices()`. With several local CPU devices (`--xla_force_host_platform_device_count`)
XLA still runs each device's share on a worker thread, and the faults remain.

Synchronous dispatch only changes when Python regains control (after the step instead of
before it): results are bit-identical, and it does not affect GPU or TPU backends.
"""
import ctypes
import logging
import sys

import jax

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_host_memory() -> bool:
  """Makes glibc's malloc serve large blocks from its heap and never trim it.

  Returns whether both settings took effect (False off Linux or with a libc that has no
  mallopt, e.g. musl, where nothing changes).
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 is glibc's "never trim" (the int is read as an unsigned size).
  return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


def configure(enabled: bool = True) -> bool:
  """Synchronous CPU dispatch and kept host memory when `enabled`; returns whether the
  malloc settings took effect. Call before JAX creates its CPU client (see module doc)."""
  if not enabled:
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  kept = keep_freed_host_memory()
  if not kept:
    logging.info('parallel.cpu_tuning: malloc settings unavailable on this platform; '
                 'dispatch is synchronous, host memory is managed as usual.')
  return kept


def ready(tree):
  """`tree` of device arrays, once their copies are done where `wait_for_inputs` (else as
  is): what the trainer and the evaluator pass to their jitted calls."""
  return jax.block_until_ready(tree) if wait_for_inputs() else tree


def wait_for_inputs() -> bool:
  """Whether a step's inputs should be ready before it is called: true on the CPU backend
  with synchronous dispatch, where a step called on inputs still in flight runs later on a
  worker thread (and its temp buffer is mmapped afresh)."""
  return jax.default_backend() == 'cpu' and not jax.config.read('jax_cpu_enable_async_dispatch')
