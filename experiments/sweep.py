"""Config sweeps: a grid of config values times seeds, one training run each, and their tables.

  python -m experiments.sweep --config=configs/clip_shapes.py[:VARIANT]
      --grid='loss.name=softmax,sigmoid' --grid='train.batch_size=16,64,256' --seeds=3
      --out=runs/sweep [--set=KEY=VALUE ...] [--examples=N] [--metrics=M1,M2,...]
      [--worker=I --num_workers=N] [--dry_run] [--report_only]

Every cell of the grid (the cartesian product of the `--grid` axes) trains once per seed
(`seed` = 0 .. seeds-1) with `python -m vlm_jax.train` in a process of its own, in
OUT/runs/<cell>/seed<k> (its output in `log.txt` there), so a run that crashes is recorded as
failed and the sweep goes on. Values are parsed as `--config.KEY=VALUE` parses them, with the
type of the config's field; a bad key or value stops the sweep before any run starts.
`--set` fixes a value for every run. `--examples=N` gives every run the same number of
training examples: train.num_steps = ceil(N / train.batch_size), with optim.warmup_steps and
checkpoint.every_steps scaled by the same factor (the config's schedule shape is kept).

Resuming: the same command again skips finished runs (their workdir holds `results.json`),
resumes half-done ones from their last checkpoint and re-runs failed ones. Adding grid values
or seeds extends a sweep; changing `--config`, `--set` or `--examples` for an existing OUT is
an error. Several hosts or devices: start the same command with `--worker=i --num_workers=n`
on each (e.g. `CUDA_VISIBLE_DEVICES=i`); worker i runs every n-th run, all write to OUT.

Writes OUT/results.csv (one row per run: grid values, seed, status, steps, wall time, every
eval metric), OUT/results.md (mean ± std over seeds per cell of the `--metrics`) and
OUT/plots/<metric>.png (each metric against the first numeric grid axis, one line per value
of the other axes, sample-std error bars).
"""
import copy
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import ml_collections
from absl import flags
from ml_collections.config_flags import tuple_parser

from experiments.ablation_utils import format_mean_std, mean_std
from vlm_jax import cli
from vlm_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_METRICS = ('eval/test_novel/zeroshot_top1', 'eval/test/zeroshot_top1',
                   'eval/test/i2t_recall@1', 'eval/test/t2i_recall@1')
RUN_RECORD = 'sweep_run.json'   # in each run's workdir: command and attempts
DEFINITION = 'sweep.json'       # in OUT: what a resumed sweep must keep equal


@dataclasses.dataclass(frozen=True)
class Axis:
  """One `--grid` axis: a config key, its values as typed and as parsed."""
  key: str
  texts: tuple[str, ...]
  values: tuple[Any, ...]

  @property
  def numeric(self) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a grid cell at a seed."""
  cell: tuple[tuple[str, str], ...]   # (key, value as typed) per axis
  seed: int
  overrides: tuple[tuple[str, str], ...]  # every --config.KEY=VALUE of its command
  num_steps: int
  workdir: str

  @property
  def name(self) -> str:
    return cell_name(self.cell)


# ---------------------------------------------------------------------------- parsing

def split_values(text: str) -> list[str]:
  """Splits at commas outside brackets and quotes: "1,(2,3),'a,b'" -> ['1', '(2,3)', "'a,b'"]."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
  parts.append(text[start:].strip())
  return parts


def _assignment(text: str, flag: str) -> tuple[str, str]:
  key, sep, value = text.partition('=')
  if not sep or not key.strip():
    raise ValueError(f'--{flag}={text!r} is not KEY=VALUE (e.g. --{flag}=train.batch_size=64).')
  return key.strip(), value


def _field(config: ml_collections.ConfigDict, key: str) -> Any:
  """The current value of a leaf key; ValueError naming the nearest key if there is none."""
  if key == 'seed':
    raise ValueError('The seed is set by --seeds, not by --grid or --set.')
  config_utils.check_overrides(config, [f'--config.{key}=_'])
  value = config
  for part in key.split('.'):
    value = value[part]
  if isinstance(value, ml_collections.ConfigDict):
    leaves = ', '.join(k for k, _ in config_utils.flatten(value, key + '.'))
    raise ValueError(f'Config key "{key}" is a group; sweep one of its keys: {leaves}.')
  return value


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """`text` parsed as `--config.KEY=text` parses it, by the type of the config's field."""
  current = _field(config, key)
  parser = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
            float: flags.FloatParser(), str: flags.ArgumentParser(),
            tuple: tuple_parser.TupleParser()}.get(type(current))
  try:
    value = parser.parse(text) if parser else text
    set_value(copy.deepcopy(config), key, value)
  except (ValueError, TypeError) as e:
    reason = ' '.join(str(e).split())
    raise ValueError(config_utils.bad_value(key, text, current, reason)) from None
  return value


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *groups, leaf = key.split('.')
  for part in groups:
    config = config[part]
  setattr(config, leaf, value)


def parse_grid(config: ml_collections.ConfigDict, grid: list[str]) -> list[Axis]:
  """`--grid` flags ('KEY=V1,V2,...') as typed axes; ValueError on any bad key or value."""
  axes = []
  for text in grid:
    key, values = _assignment(text, 'grid')
    if any(a.key == key for a in axes):
      raise ValueError(f'Config key "{key}" appears in two --grid flags; give its values once.')
    texts = tuple(split_values(values))
    if not all(texts):
      raise ValueError(f'--grid={text!r} has an empty value; give KEY=V1,V2,...')
    parsed = tuple(parse_value(config, key, t) for t in texts)
    if len(set(map(repr, parsed))) < len(parsed):
      raise ValueError(f'--grid={text!r} gives the same value twice (parsed: {list(parsed)}).')
    axes.append(Axis(key, texts, parsed))
  return axes


def cell_name(cell: tuple[tuple[str, str], ...]) -> str:
  """A cell's directory name: 'loss.name=softmax,train.batch_size=16' ('all' for no axes)."""
  name = ','.join(f'{k}={v}' for k, v in cell) or 'all'
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)


# ------------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Sweep:
  """A parsed sweep: the config, the grid, the fixed values and the runs."""
  config_spec: str              # absolute configs/NAME.py[:VARIANT]
  axes: tuple[Axis, ...]
  sets: tuple[tuple[str, str], ...]
  examples: int
  out: str
  runs: tuple[Run, ...]

  def definition(self) -> dict:
    return {'config': self.config_spec, 'set': [list(s) for s in self.sets],
            'examples': self.examples}


def load_config(spec: str) -> tuple[str, ml_collections.ConfigDict]:
  """(absolute spec, config) of `configs/NAME.py[:VARIANT]`; ValueError if it cannot load."""
  path, sep, variant = spec.partition(':')
  if not os.path.exists(path):
    raise ValueError(f'Config file {path!r} does not exist (expected configs/NAME.py[:VARIANT]).')
  spec = os.path.abspath(path) + sep + variant
  try:
    return spec, cli._load_config_file(spec)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Loading config {spec!r} failed: {type(e).__name__}: {e}') from None


def _scaled(value: int, factor: float) -> int:
  return max(int(round(value * factor)), 1) if value > 0 else value


def plan(config_spec: str, grid: list[str], sets: list[str], seeds: int, out: str,
         examples: int = 0) -> Sweep:
  """Parses and checks everything; the runs in order (every cell at seed 0, then seed 1, ...).

  Raises ValueError, naming what was wrong, for a bad config, key, value or combination.
  """
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: give the number of seeds, at least 1.')
  spec, config = load_config(config_spec)
  fixed = []
  for text in sets:
    key, value = _assignment(text, 'set')
    set_value(config, key, parse_value(config, key, value))
    fixed.append((key, value))
  axes = tuple(parse_grid(config, grid))
  if examples and 'train.num_steps' in [k for k, _ in fixed] + [a.key for a in axes]:
    raise ValueError('--examples sets train.num_steps; do not also give it in --grid or --set.')
  clash = sorted({k for k, _ in fixed} & {a.key for a in axes})
  if clash:
    raise ValueError(f'{clash} given in both --grid and --set; give each key once.')
  runs, names = [], {}
  for seed in range(seeds):
    for values in itertools.product(*[zip(a.texts, a.values) for a in axes]):
      cell = tuple((a.key, text) for a, (text, _) in zip(axes, values))
      run_config = copy.deepcopy(config)
      for a, (_, value) in zip(axes, values):
        set_value(run_config, a.key, value)
      derived = []
      if examples:
        steps = math.ceil(examples / run_config.train.batch_size)
        factor = steps / run_config.train.num_steps
        run_config.train.num_steps = steps
        run_config.optim.warmup_steps = _scaled(run_config.optim.warmup_steps, factor)
        run_config.checkpoint.every_steps = _scaled(run_config.checkpoint.every_steps, factor)
        derived = [('train.num_steps', str(steps)),
                   ('optim.warmup_steps', str(run_config.optim.warmup_steps)),
                   ('checkpoint.every_steps', str(run_config.checkpoint.every_steps))]
      config_utils.check_values(run_config)  # a misspelt loss fails here, not in every run
      name = cell_name(cell)
      if names.setdefault(name, cell) != cell:
        raise ValueError(f'Cells {names[name]} and {cell} share the directory name {name!r}.')
      runs.append(Run(cell=cell, seed=seed, num_steps=run_config.train.num_steps,
                      overrides=(*fixed, *cell, *derived, ('seed', str(seed))),
                      workdir=os.path.join(out, 'runs', name, f'seed{seed}')))
  return Sweep(spec, axes, tuple(fixed), examples, out, tuple(runs))


def check_definition(sweep: Sweep) -> None:
  """Records the sweep's definition in OUT, or checks that a resumed one keeps it."""
  path = os.path.join(sweep.out, DEFINITION)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != sweep.definition():
      raise ValueError(f'{sweep.out} holds a sweep of {json.dumps(stored)}; this command asks for '
                       f'{json.dumps(sweep.definition())}. Use another --out, or the same '
                       '--config, --set and --examples to resume it.')
    return
  os.makedirs(sweep.out, exist_ok=True)
  _write_atomic(path, json.dumps(sweep.definition(), indent=2))


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


# -------------------------------------------------------------------------- execution

def command(sweep: Sweep, run: Run) -> list[str]:
  return [sys.executable, '-m', 'vlm_jax.train', f'--config={sweep.config_spec}',
          f'--workdir={run.workdir}', *[f'--config.{k}={v}' for k, v in run.overrides]]


def _record(run: Run) -> dict:
  path = os.path.join(run.workdir, RUN_RECORD)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def status(run: Run) -> str:
  """'finished' (results.json), 'failed' (last attempt exited non-zero), 'incomplete'
  (started, not finished: resumes from its checkpoint) or 'pending'."""
  if os.path.exists(os.path.join(run.workdir, 'results.json')):
    return 'finished'
  attempts = _record(run).get('attempts', [])
  if attempts and attempts[-1]['returncode'] != 0:
    return 'failed'
  return 'incomplete' if os.path.isdir(run.workdir) else 'pending'


def _last_error(log_path: str) -> str:
  """The last `error: ...` or `SomeError: ...` line of a failed run's log, else its last line."""
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines
            if line.startswith('error:') or re.match(r'[\w.]*(Error|Exception|Interrupt)\b', line)]
  return (errors or lines or ['(no output)'])[-1][:500]


def execute(sweep: Sweep, run: Run, compilation_cache: str = '') -> dict:
  """Runs (or resumes) one run in its own process; appends the attempt to its record.

  compilation_cache: JAX's persistent compilation cache directory for the run ('' = none;
  a JAX_COMPILATION_CACHE_DIR in the environment wins). The seeds of a cell compile the same
  programs, so all but the first load them from the cache.
  """
  os.makedirs(run.workdir, exist_ok=True)
  cmd = command(sweep, run)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  if compilation_cache:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.abspath(compilation_cache))
  log_path = os.path.join(run.workdir, 'log.txt')
  start = time.time()
  with open(log_path, 'a') as log:
    log.write(f'\n$ {" ".join(cmd)}\n')
    log.flush()
    returncode = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  record = _record(run)
  attempt = {'returncode': returncode, 'wall_s': time.time() - start, 'started': start}
  if returncode:
    attempt['error'] = _last_error(log_path)
  record.update(command=cmd, attempts=[*record.get('attempts', []), attempt])
  _write_atomic(os.path.join(run.workdir, RUN_RECORD), json.dumps(record, indent=2))
  return attempt


def run_sweep(sweep: Sweep, worker: int = 0, num_workers: int = 1,
              compilation_cache: str | None = None) -> None:
  """Runs this worker's share of the runs that are not finished, one after another.

  compilation_cache: see `execute`; None = OUT/jax_cache.
  """
  if compilation_cache is None:
    compilation_cache = os.path.join(sweep.out, 'jax_cache')
  check_definition(sweep)
  mine = sweep.runs[worker::num_workers]
  todo = [r for r in mine if status(r) != 'finished']
  logging.info('sweep: %d runs, %d for worker %d, %d of them still to run', len(sweep.runs),
               len(mine), worker, len(todo))
  for i, run in enumerate(todo):
    was = status(run)
    logging.info('sweep [%d/%d] %s seed %d (%s, %d steps)', i + 1, len(todo), run.name,
                 run.seed, 'resuming' if was == 'incomplete' else 'starting', run.num_steps)
    attempt = execute(sweep, run, compilation_cache)
    now = status(run)
    if now == 'failed':
      logging.error('sweep: %s seed %d FAILED (exit %d) after %.0f s: %s (log: %s)', run.name,
                    run.seed, attempt['returncode'], attempt['wall_s'], attempt['error'],
                    os.path.join(run.workdir, 'log.txt'))
    else:
      logging.info('sweep: %s seed %d %s in %.0f s', run.name, run.seed, now, attempt['wall_s'])


# ---------------------------------------------------------------------------- results

def collect(sweep: Sweep) -> list[dict]:
  """One row per run: grid values (as typed), seed, status, steps, wall time, eval metrics."""
  rows = []
  for run in sweep.runs:
    row = dict(run.cell, seed=run.seed, status=status(run), steps=run.num_steps)
    attempts = _record(run).get('attempts', [])
    row['wall_s'] = round(sum(a['wall_s'] for a in attempts), 1) if attempts else None
    if row['status'] == 'finished':
      with open(os.path.join(run.workdir, 'results.json')) as f:
        row.update(json.load(f))
    rows.append(row)
  return rows


def metric_keys(rows: list[dict]) -> list[str]:
  return sorted({k for row in rows for k in row if k.startswith('eval/')})


def write_csv(rows: list[dict], axes: tuple[Axis, ...], path: str) -> None:
  head = [a.key for a in axes] + ['seed', 'status', 'steps', 'wall_s'] + metric_keys(rows)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, head, restval='', lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  _write_atomic(path, buffer.getvalue())


def summarize(rows: list[dict], axes: tuple[Axis, ...], metrics: list[str]) -> list[dict]:
  """Per cell, in grid order: its values, seeds finished and run, steps, and the values of
  each metric and of the wall time over its finished seeds."""
  cells = {}
  for row in rows:
    cells.setdefault(tuple(row[a.key] for a in axes), []).append(row)
  summary = []
  for values, group in cells.items():
    done = [r for r in group if r['status'] == 'finished']
    entry = {'values': values, 'finished': len(done), 'runs': len(group),
             'steps': group[0]['steps'], 'wall_s': [r['wall_s'] for r in done]}
    entry.update({m: [r.get(m) for r in done] for m in metrics})
    summary.append(entry)
  return summary


def markdown_table(summary: list[dict], axes: tuple[Axis, ...], metrics: list[str],
                   scale: float = 1.0, digits: int = 3) -> str:
  head = [a.key for a in axes] + ['steps', 'seeds'] + metrics + ['wall (s)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for cell in summary:
    cells = [*cell['values'], str(cell['steps']), f'{cell["finished"]}/{cell["runs"]}']
    cells += [format_mean_std(cell[m], scale, digits) for m in metrics]
    cells.append(format_mean_std(cell['wall_s'], digits=0))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def x_axis(axes: tuple[Axis, ...]) -> int:
  """Index of the axis plotted along x: the first numeric one, else the first."""
  return next((i for i, a in enumerate(axes) if a.numeric), 0)


def plot_metric(ax, summary: list[dict], axes: tuple[Axis, ...], metric: str,
                scale: float = 1.0) -> None:
  """Draws `metric` (mean, sample-std error bars) against the x axis on matplotlib `ax`,
  one line per combination of the other axes' values."""
  xi = x_axis(axes)
  x_axis_ = axes[xi]
  position = {t: (v if x_axis_.numeric else i)
              for i, (t, v) in enumerate(zip(x_axis_.texts, x_axis_.values))}
  lines = {}
  for cell in summary:
    others = tuple(f'{a.key}={v}' for j, (a, v) in enumerate(zip(axes, cell['values'])) if j != xi)
    mean, std = mean_std(cell[metric])
    if not math.isnan(mean):
      lines.setdefault(others, []).append((position[cell['values'][xi]], scale * mean,
                                           scale * std))
  for label, points in lines.items():
    xs, ys, es = zip(*sorted(points))
    ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=', '.join(label) or None)
  if x_axis_.numeric and min(x_axis_.values) > 0 and max(x_axis_.values) >= 8 * min(x_axis_.values):
    powers_of_two = all(float(v).is_integer() and int(v) & (int(v) - 1) == 0
                        for v in x_axis_.values)
    ax.set_xscale('log', base=2 if powers_of_two else 10)
  ax.set_xticks(list(position.values()), list(position))
  ax.minorticks_off()
  ax.set_xlabel(x_axis_.key)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if any(lines):
    ax.legend(fontsize=8)


def plot_file_name(metric: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]', '_', metric) + '.png'


def write_plots(summary: list[dict], axes: tuple[Axis, ...], metrics: list[str],
                directory: str) -> list[str]:
  """One PNG per metric in `directory`; returns their paths (none without a grid axis)."""
  if not axes:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  paths = []
  for metric in metrics:
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_metric(ax, summary, axes, metric)
    fig.tight_layout()
    paths.append(os.path.join(directory, plot_file_name(metric)))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def report(sweep: Sweep, metrics: list[str], command_line: str = '') -> list[dict]:
  """Writes OUT/results.csv, OUT/results.md and OUT/plots/*.png; returns the rows."""
  rows = collect(sweep)
  available = metric_keys(rows)
  missing = [m for m in metrics if m not in available]
  if missing and available:
    logging.warning('sweep: no finished run reports %s; the runs report: %s', missing,
                    ', '.join(available))
  summary = summarize(rows, sweep.axes, metrics)
  write_csv(rows, sweep.axes, os.path.join(sweep.out, 'results.csv'))
  counts = {s: sum(r['status'] == s for r in rows) for s in ('finished', 'failed',
                                                             'incomplete', 'pending')}
  sets = ', '.join(f'`{k}={v}`' for k, v in sweep.sets) or 'none'
  text = (f'# Sweep of `{os.path.relpath(sweep.config_spec)}`\n\n'
          + (f'`{command_line}`\n\n' if command_line else '')
          + f'Fixed values: {sets}.'
          + (f' Every run trains on {sweep.examples} examples.' if sweep.examples else '')
          + f' Runs: {", ".join(f"{n} {s}" for s, n in counts.items() if n)}. Mean ± sample '
          'std over the finished seeds of each cell; per-run numbers in results.csv.\n\n'
          + markdown_table(summary, sweep.axes, metrics) + '\n')
  plots = write_plots(summary, sweep.axes, [m for m in metrics if m in available],
                      os.path.join(sweep.out, 'plots'))
  text += ''.join(f'\n![{os.path.basename(p)}]({os.path.relpath(p, sweep.out)})\n' for p in plots)
  _write_atomic(os.path.join(sweep.out, 'results.md'), text)
  return rows


# ------------------------------------------------------------------------------- main

def define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that other scripts can
  import this module beside their own flags)."""
  flags.DEFINE_string('config', None, 'Config file, configs/NAME.py[:VARIANT].')
  flags.DEFINE_multi_string('grid', [], "An axis, 'KEY=V1,V2,...' (commas inside brackets or "
                            'quotes do not split); repeat for more axes.')
  flags.DEFINE_multi_string('set', [], "'KEY=VALUE' for every run; repeatable.")
  flags.DEFINE_integer('seeds', 1, 'Seeds per cell: seed = 0 .. seeds-1.')
  flags.DEFINE_string('out', None, 'Sweep directory: runs/, results.csv, results.md, plots/.')
  flags.DEFINE_integer('examples', 0, 'If > 0, every run trains on this many examples: '
                       'train.num_steps = ceil(examples / batch_size).', lower_bound=0)
  flags.DEFINE_list('metrics', list(DEFAULT_METRICS), 'Metrics of results.md and the plots '
                    '(results.csv has every eval metric).')
  flags.DEFINE_integer('worker', 0, 'This worker runs runs[worker::num_workers].',
                       lower_bound=0)
  flags.DEFINE_integer('num_workers', 1, 'Workers sharing the sweep.', lower_bound=1)
  flags.DEFINE_string('compilation_cache', None, "JAX's persistent compilation cache for the "
                      "runs; default OUT/jax_cache, '' for none.")
  flags.DEFINE_bool('dry_run', False, 'Print the runs and their commands; run nothing.')
  flags.DEFINE_bool('report_only', False, 'Write the results of the runs finished so far; '
                    'run nothing.')


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.config or not f.out:
    raise cli.UserError('--config and --out are required, e.g. --config=configs/clip_shapes.py '
                        '--out=runs/sweep')
  if f.worker >= f.num_workers:
    raise cli.UserError(f'--worker={f.worker} must be below --num_workers={f.num_workers}.')
  try:
    sweep = plan(f.config, f.grid, f.set, f.seeds, f.out, f.examples)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if f.dry_run:
    for run in sweep.runs[f.worker::f.num_workers]:
      print(f'{status(run):10s} {" ".join(command(sweep, run))}')
    return
  try:
    if not f.report_only:
      run_sweep(sweep, f.worker, f.num_workers, f.compilation_cache)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  rows = report(sweep, list(f.metrics), ' '.join(['python -m experiments.sweep', *sys.argv[1:]]))
  failed = [r for r in rows if r['status'] == 'failed']
  with open(os.path.join(sweep.out, 'results.md')) as md:
    print(md.read())
  if failed:
    raise cli.UserError(f'{len(failed)} of {len(rows)} runs failed; their errors are in their '
                        f'{RUN_RECORD} and log.txt under {sweep.out}/runs.')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
