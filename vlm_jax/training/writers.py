"""Metric writers: `metrics.jsonl` (one JSON object per line, always with "step") and TensorBoard."""
import json
import logging
import math
import os
from typing import Any, Mapping

import numpy as np

# Measured wall-clock rates: the only values of metrics.jsonl that differ between two runs
# of the same config and seed on CPU (leave them out when comparing runs).
WALL_CLOCK_KEYS = ('train/examples_per_sec', 'train/steps_per_sec')


def _scalar(value: Any) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) else float(value)


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; a no-op unless `enabled`
  (only process 0 writes in multi-host runs).

  `resume_step`: the step the run (re)starts from. Rows of later steps, written by a run that
  died after its last checkpoint, are dropped from metrics.jsonl (with a line cut short by the
  crash), and TensorBoard is told to discard its events past that step, so a resumed run's
  files end as an uninterrupted run's would.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      dropped = truncate_rows(self._path, resume_step)
      if dropped:
        logging.info('Dropped %d row(s) of %s past step %d (written after the checkpoint the '
                     'run resumes from).', dropped, self._path, resume_step)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(row, allow_nan=True) + '\n')
    for key, value in row.items():
      if key != 'step' and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def truncate_rows(path: str, last_step: int) -> int:
  """Keeps the rows of `path` up to step `last_step` (and none that does not parse); writes
  the file anew only if something is dropped, atomically. Returns the number dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        keep = json.loads(line)['step'] <= last_step and line.endswith('\n')
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line)
      else:
        dropped += bool(line.strip())
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def without_wall_clock(rows: list[dict]) -> list[dict]:
  """`rows` without `WALL_CLOCK_KEYS`: what two runs of one config and seed share on CPU."""
  return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]
