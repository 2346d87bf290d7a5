"""Multi-process (multi-host) setup: `jax.distributed.initialize` from flags or the environment.

One JAX process runs per host (or per GPU); together they form one global device mesh. Each
process reads its own slice of every global batch, and the jitted train step sees global
arrays. Call `initialize` first thing in an entry point, before anything touches a device.

How the processes find each other, in order of precedence:

1. Flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (all three; the
   address is process 0's host and a free port, the same for every process).
2. `VLM_JAX_DISTRIBUTED=1`: `jax.distributed.initialize()` detects the cluster itself (Cloud
   TPU pods, SLURM, Open MPI, Kubernetes; see JAX's multi-process docs).
3. Inside a SLURM step (`srun`) of more than one task, the same auto-detection runs unless
   `VLM_JAX_DISTRIBUTED=0`.
4. Otherwise: one process, nothing to initialize.

On CPU, cross-process collectives use gloo. `--num_cpu_devices=K` (or the environment variable
`JAX_NUM_CPU_DEVICES=K`) gives each process K CPU devices, e.g. to test a multi-process mesh
on one machine:

  python -m vlm_jax.train --config=... --workdir=DIR --num_cpu_devices=4 \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0   # and =1
"""
import dataclasses
import logging
import os
from typing import Callable, Mapping, TypeVar

from absl import flags
import jax
from jax.experimental import multihost_utils

T = TypeVar('T')

ENV_VAR = 'VLM_JAX_DISTRIBUTED'
_SLURM_STEP_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                    'SLURM_LOCALID')


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to start the multi-process runtime; `mode` is 'none', 'explicit' or 'auto'."""
  mode: str = 'none'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def define_flags() -> None:
  """Defines --coordinator_address, --num_processes, --process_id and --num_cpu_devices."""
  flags.DEFINE_string(
      'coordinator_address', None,
      'Multi-process runs: HOST:PORT of process 0, the same for all processes. Needs '
      '--num_processes and --process_id. Without these flags, a SLURM step of several tasks '
      f'(or {ENV_VAR}=1 on TPU pods and other clusters) is detected automatically.')
  flags.DEFINE_integer('num_processes', None, 'Multi-process runs: the number of processes.')
  flags.DEFINE_integer('process_id', None,
                       'Multi-process runs: this process\'s index in [0, num_processes).')
  flags.DEFINE_integer(
      'num_cpu_devices', None,
      'CPU only: the number of CPU devices of this process (JAX\'s jax_num_cpu_devices; '
      'default 1, or JAX_NUM_CPU_DEVICES). Must not be combined with '
      '--xla_force_host_platform_device_count in XLA_FLAGS.')


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
  """Decides how to start from the flags' values and the environment (see the module doc)."""
  environ = os.environ if environ is None else environ
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together; '
                       f'got {coordinator_address=}, {num_processes=}, {process_id=}.')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} is not in [0, --num_processes='
                       f'{num_processes}).')
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address={coordinator_address!r} must be HOST:PORT.')
    return Settings('explicit', coordinator_address, num_processes, process_id)
  switch = environ.get(ENV_VAR, '').strip().lower()
  if switch in ('1', 'true', 'yes'):
    return Settings('auto')
  if switch in ('0', 'false', 'no'):
    return Settings()
  if switch:
    raise ValueError(f'{ENV_VAR}={environ[ENV_VAR]!r}: use 1 (detect the cluster) or 0 (off).')
  if all(v in environ for v in _SLURM_STEP_VARS) and int(environ['SLURM_NTASKS']) > 1:
    return Settings('auto')
  return Settings()


def initialize(settings: Settings, num_cpu_devices: int | None = None) -> None:
  """Configures CPU devices and collectives, then starts the multi-process runtime if asked.

  Must run before anything initialises a JAX backend (creates arrays, lists devices).
  """
  if num_cpu_devices is not None:
    if num_cpu_devices < 1:
      raise ValueError(f'--num_cpu_devices={num_cpu_devices} must be positive.')
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  if settings.mode == 'none':
    return
  # Only the CPU client reads this; harmless on GPU and TPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if settings.mode == 'explicit':
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id)
  else:
    jax.distributed.initialize()
  logging.info('Process %d of %d started (%s); %d local device(s), %d in all.',
               jax.process_index(), jax.process_count(), settings.mode,
               jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  """`initialize` with the values of the flags of `define_flags` (raises ValueError)."""
  values = flags.FLAGS
  settings = resolve(values.coordinator_address, values.num_processes, values.process_id)
  initialize(settings, values.num_cpu_devices)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes metrics, results and configs."""
  return jax.process_index() == 0


def primary_first(fn: Callable[[], T], name: str) -> T:
  """Runs `fn` on process 0, waits for it on all processes, then runs it on the others.

  For idempotent work with shared side effects, such as building a dataset on a shared
  filesystem: the others then find it done instead of racing to write it.
  """
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_primary() else None
  multihost_utils.sync_global_devices(f'vlm_jax:{name}')
  return result if is_primary() else fn()
