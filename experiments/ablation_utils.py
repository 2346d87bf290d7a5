"""Helpers shared by the ablation scripts: mean ± std, step times from a run's metrics and a
dependency-free SVG bar chart."""
import json
import math
import os
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation of the values that are not None or NaN."""
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return float('nan'), float('nan')
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
  """'mean ± std' of `mean_std(values)` times `scale`, or '—' when no value is there."""
  mean, std = mean_std(values)
  return '—' if math.isnan(mean) else f'{scale * mean:.{digits}f} ± {scale * std:.{digits}f}'


def step_time_ms(workdir: str) -> float:
  """Median train step time from metrics.jsonl, the first (compiling) window left out."""
  rates = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'train/steps_per_sec' in row:
        rates.append(row['train/steps_per_sec'])
  rates = rates[1:] or rates
  return 1000.0 / statistics.median(rates) if rates else float('nan')


def bar_chart_svg(bars: list[tuple[str, list[float]]], title: str,
                  reference: float | None = 50) -> str:
  """An SVG bar chart of mean ± std per bar, of values in [0, 1] shown in %.

  Args:
    bars: (label, values) per bar, left to right; a bar without values leaves its slot empty.
    title: the title above the plot.
    reference: a dashed red line at this percentage (chance), or None.
  """
  width, height, left, bottom, bar = max(520, 70 + 90 * len(bars)), 300, 50, 40, 60
  plot_h = height - bottom - 30
  y = lambda v: height - bottom - plot_h * v / 100
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<text x="{width / 2}" y="18" text-anchor="middle">{title}</text>']
  for tick in range(0, 101, 25):
    parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(tick)}" y2="{y(tick)}" '
                 'stroke="#ddd"/>')
    parts.append(f'<text x="{left - 6}" y="{y(tick) + 4}" text-anchor="end">{tick}</text>')
  if reference is not None:
    parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(reference)}" '
                 f'y2="{y(reference)}" stroke="#c33" stroke-dasharray="4 3"/>')
  for i, (label, values) in enumerate(bars):
    mean, std = mean_std(values)
    if math.isnan(mean):
      continue
    x = left + 20 + i * (bar + 30)
    parts.append(f'<rect x="{x}" y="{y(100 * mean)}" width="{bar}" '
                 f'height="{y(0) - y(100 * mean)}" fill="#4a7ab5"/>')
    parts.append(f'<line x1="{x + bar / 2}" x2="{x + bar / 2}" y1="{y(100 * (mean - std))}" '
                 f'y2="{y(100 * (mean + std))}" stroke="black"/>')
    parts.append(f'<text x="{x + bar / 2}" y="{height - bottom + 16}" '
                 f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{x + bar / 2}" y="{y(100 * mean) - 6}" '
                 f'text-anchor="middle">{100 * mean:.1f}</text>')
  parts.append('</svg>')
  return '\n'.join(parts)
