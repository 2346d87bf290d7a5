"""Metric writers: `metrics.jsonl` (one JSON object per line, always with "step") and TensorBoard."""
import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _scalar(value: Any) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) else float(value)


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; a no-op unless `enabled`
  (only process 0 writes in multi-host runs)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
