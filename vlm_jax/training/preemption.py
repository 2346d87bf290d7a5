"""Preemption notices: SIGTERM becomes a flag that the training loop checks after every step.

Schedulers of preemptible machines (Cloud TPU and GPU VMs, SLURM with `--signal`,
Kubernetes) send SIGTERM some seconds before they stop a process. The loop then saves a
checkpoint at the step it is at and exits 0; the same command resumes from it.

One process: a Python signal handler sets the flag (a second SIGTERM while the checkpoint is
written terminates at once; the checkpoints written so far stay usable). Before the first step
(dataset build, set-up, restore: `interrupting()`) there is nothing to save, so the notice
raises Preempted at once; the trainer then exits 0 and the same command starts again (tfds
removes a half-built dataset). Several processes:
they must all save at the same step, so the flag comes from JAX's preemption service
(`multihost_utils.reached_preemption_sync_point`), which catches SIGTERM itself, tells the
other processes, and agrees on the first step that every process can still reach. It needs
`requested(step)` on every process at every step, which costs no communication until a
notice arrives.
"""
import contextlib
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(BaseException):
  """A preemption notice before the first step (a BaseException, like KeyboardInterrupt, so
  that no `except Exception` on the way swallows it)."""


class Watcher:
  """A context manager; `requested(step)` says whether to save and stop after step `step`."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, object] = {}
    self._received: int | None = None
    self._multiprocess = False
    self._interrupting = False

  def __enter__(self) -> 'Watcher':
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      return self  # JAX's preemption service handles SIGTERM
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Training outside the main thread: SIGTERM will not save a checkpoint.')
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self._received = signum
    # A second notice while the checkpoint is written gets the usual behaviour (terminate).
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    if self._interrupting:
      raise Preempted(signal.Signals(signum).name)
    logging.warning('Received %s: saving a checkpoint after this step, then exiting.',
                    signal.Signals(signum).name)

  @contextlib.contextmanager
  def interrupting(self):
    """Within: a notice raises Preempted (there is no step to save at yet)."""
    if self._received is not None:
      raise Preempted(self.signal_name)
    self._interrupting = True
    try:
      yield
    finally:
      self._interrupting = False

  @property
  def signal_name(self) -> str:
    return signal.Signals(self._received).name if self._received else 'a preemption notice'

  def requested(self, step: int) -> bool:
    """True once a notice has come (all processes: at the step they agreed on)."""
    if self._multiprocess:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service turned off
        logging.warning('SIGTERM will not save a checkpoint: %s', e)
        self._multiprocess = False
    return self._received is not None
