"""experiments/sweep.py: grid parsing and expansion, errors, resuming, tables and plots."""
import csv
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from experiments import sweep as sweep_lib
from run_configs import REPO  # pylint: disable=g-bad-import-order

TINY = os.path.join(REPO, 'configs', 'clip_shapes.py') + ':tiny'


def test_split_values_keeps_brackets_and_quotes():
  assert sweep_lib.split_values("1, (2,3),'a,b',[4,5]") == ['1', '(2,3)', "'a,b'", '[4,5]']
  assert sweep_lib.split_values('softmax') == ['softmax']


def test_grid_values_are_typed_and_expanded_seed_major(tmp_path):
  sweep = sweep_lib.plan(TINY, ['loss.name=softmax,sigmoid', 'optim.learning_rate=1e-3,3e-4',
                                'eval.zeroshot=true,false', "eval.splits=('test',)"],
                         ['train.batch_size=32'], 2, str(tmp_path))
  values = {a.key: a.values for a in sweep.axes}
  assert values == {'loss.name': ('softmax', 'sigmoid'), 'optim.learning_rate': (1e-3, 3e-4),
                    'eval.zeroshot': (True, False), 'eval.splits': (('test',),)}
  assert [a.numeric for a in sweep.axes] == [False, True, False, False]
  assert len(sweep.runs) == 2 * 2 * 2 * 1 * 2
  assert [r.seed for r in sweep.runs] == [0] * 8 + [1] * 8
  first, last = sweep.runs[0], sweep.runs[-1]
  assert first.cell == (('loss.name', 'softmax'), ('optim.learning_rate', '1e-3'),
                        ('eval.zeroshot', 'true'), ('eval.splits', "('test',)"))
  assert dict(last.cell)['loss.name'] == 'sigmoid' and dict(last.cell)['eval.zeroshot'] == 'false'
  assert len({r.workdir for r in sweep.runs}) == 16
  assert last.workdir.endswith(os.path.join(
      'runs', 'loss.name=sigmoid,optim.learning_rate=3e-4,eval.zeroshot=false,'
      "eval.splits=__test_,_", 'seed1'))
  assert dict(first.overrides) == {'train.batch_size': '32', **dict(first.cell), 'seed': '0'}
  cmd = sweep_lib.command(sweep, first)
  assert cmd[1:4] == ['-m', 'vlm_jax.train', f'--config={TINY}']
  assert '--config.optim.learning_rate=1e-3' in cmd and '--config.seed=0' in cmd


def test_examples_budget_sets_steps_and_scales_schedule(tmp_path):
  # tiny: 6 steps, warmup 2, checkpoint every 3
  sweep = sweep_lib.plan(TINY, ['train.batch_size=16,64'], [], 1, str(tmp_path), examples=100)
  small, large = sweep.runs
  assert (small.num_steps, large.num_steps) == (7, 2)   # ceil(100 / 16), ceil(100 / 64)
  assert dict(small.overrides)['optim.warmup_steps'] == str(round(2 * 7 / 6))
  assert dict(large.overrides)['checkpoint.every_steps'] == str(max(round(3 * 2 / 6), 1))


@pytest.mark.parametrize('grid,sets,match', [
    (['train.batch_sze=1,2'], [], 'Unknown config key "train.batch_sze". Did you mean '
                                  '"train.batch_size"'),
    (['train.batch_size=16,1.5'], [], "Bad value '1.5' for config key \"train.batch_size\" "
                                      r'\(type int'),
    (['eval.zeroshot=maybe'], [], "Bad value 'maybe'.*type bool"),
    (['optim.learning_rate=x'], [], "Bad value 'x'.*type float"),
    (['model.image=1'], [], 'is a group; sweep one of its keys: model.image.depth'),
    (['seed=1,2'], [], 'set by --seeds'),
    (['train.batch_size=16,016'], [], 'same value twice'),
    (['loss.name='], [], 'empty value'),
    (['loss.name'], [], 'is not KEY=VALUE'),
    (['loss.name=softmax', 'loss.name=sigmoid'], [], 'two --grid flags'),
    (['loss.name=softmax,sigmoid'], ['loss.name=softmax'], 'in both --grid and --set'),
    ([], ['train.num_stepz=3'], 'Did you mean "train.num_steps"'),
])
def test_bad_keys_and_values_fail_before_any_run(tmp_path, grid, sets, match):
  with pytest.raises(ValueError, match=match):
    sweep_lib.plan(TINY, grid, sets, 1, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_bad_config_examples_and_seeds(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    sweep_lib.plan('configs/nope.py', [], [], 1, str(tmp_path))
  with pytest.raises(ValueError, match="Unknown variant 'tin'"):
    sweep_lib.plan(TINY[:-1], [], [], 1, str(tmp_path))
  with pytest.raises(ValueError, match='--examples sets train.num_steps'):
    sweep_lib.plan(TINY, ['train.num_steps=2,4'], [], 1, str(tmp_path), examples=64)
  with pytest.raises(ValueError, match='at least 1'):
    sweep_lib.plan(TINY, [], [], 0, str(tmp_path))


def _fake_commands(monkeypatch, metrics_of, fail=()):
  """Replaces each run's training command by a script that writes `metrics_of(run)` as its
  results.json, or fails with a ValueError for the runs in `fail`; returns the started runs."""
  started = []

  def command(sweep, run):
    del sweep
    started.append(run)
    if (run.name, run.seed) in fail:
      code = 'import sys; print("step 1"); print("ValueError: no such thing"); sys.exit(3)'
    else:
      path = os.path.join(run.workdir, 'results.json')
      code = f'import json; json.dump({metrics_of(run)!r}, open({path!r}, "w"))'
    return [sys.executable, '-c', code]

  monkeypatch.setattr(sweep_lib, 'command', command)
  return started


def _metrics(run):
  rng = np.random.default_rng(zlib.crc32(f'{run.name} {run.seed}'.encode()))
  return {'eval/test/zeroshot_top1': float(rng.random()),
          'eval/test/i2t_recall@1': float(rng.random())}


def test_failed_run_is_recorded_and_the_sweep_goes_on_then_resumes(tmp_path, monkeypatch):
  out = str(tmp_path)
  sweep = sweep_lib.plan(TINY, ['loss.name=softmax,sigmoid'], [], 2, out)
  fail = {('loss.name=softmax', 1)}
  started = _fake_commands(monkeypatch, _metrics, fail)
  sweep_lib.run_sweep(sweep, compilation_cache='')
  assert len(started) == 4
  assert [sweep_lib.status(r) for r in sweep.runs] == ['finished', 'finished', 'failed',
                                                       'finished']
  record = json.load(open(os.path.join(sweep.runs[2].workdir, sweep_lib.RUN_RECORD)))
  assert record['attempts'][-1]['returncode'] == 3
  assert record['attempts'][-1]['error'] == 'ValueError: no such thing'
  # resuming re-runs only the failed run (it succeeds now); finished ones are skipped
  started.clear()
  fail.clear()
  sweep_lib.run_sweep(sweep, compilation_cache='')
  assert started == [sweep.runs[2]]
  assert sweep_lib.status(sweep.runs[2]) == 'finished'
  record = json.load(open(os.path.join(sweep.runs[2].workdir, sweep_lib.RUN_RECORD)))
  assert [a['returncode'] for a in record['attempts']] == [3, 0]


def test_workers_partition_the_runs(tmp_path, monkeypatch):
  sweep = sweep_lib.plan(TINY, ['train.batch_size=16,32,64'], [], 1, str(tmp_path))
  started = _fake_commands(monkeypatch, _metrics)
  sweep_lib.run_sweep(sweep, worker=1, num_workers=2, compilation_cache='')
  assert started == [sweep.runs[1]]


def test_resume_with_another_definition_is_refused(tmp_path, monkeypatch):
  _fake_commands(monkeypatch, _metrics)
  sweep_lib.run_sweep(sweep_lib.plan(TINY, [], ['train.batch_size=32'], 1, str(tmp_path)),
                      compilation_cache='')
  # more seeds or grid values extend the sweep; other fixed values are another sweep
  sweep_lib.run_sweep(sweep_lib.plan(TINY, ['loss.name=softmax,sigmoid'],
                                     ['train.batch_size=32'], 2, str(tmp_path)),
                      compilation_cache='')
  with pytest.raises(ValueError, match='holds a sweep of'):
    sweep_lib.run_sweep(sweep_lib.plan(TINY, [], ['train.batch_size=64'], 1, str(tmp_path)))


def test_results_csv_md_and_plots(tmp_path, monkeypatch):
  out = str(tmp_path)
  grid = ['loss.name=softmax,sigmoid', 'train.batch_size=16,64,256']
  sweep = sweep_lib.plan(TINY, grid, [], 3, out)
  _fake_commands(monkeypatch, _metrics, fail={('loss.name=sigmoid,train.batch_size=64', 2)})
  sweep_lib.run_sweep(sweep, compilation_cache='')
  metrics = ['eval/test/zeroshot_top1', 'eval/test/i2t_recall@1']
  sweep_lib.report(sweep, metrics)

  with open(os.path.join(out, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 18
  assert list(rows[0])[:6] == ['loss.name', 'train.batch_size', 'seed', 'status', 'steps',
                               'wall_s']
  assert sorted(list(rows[0])[6:]) == sorted(metrics)
  failed = [r for r in rows if r['status'] == 'failed']
  assert len(failed) == 1 and failed[0]['eval/test/zeroshot_top1'] == ''
  for row, run in zip(rows, sweep.runs):
    if row['status'] == 'finished':
      assert float(row['eval/test/zeroshot_top1']) == _metrics(run)['eval/test/zeroshot_top1']
      assert float(row['wall_s']) >= 0   # recorded (fake runs take ~0 s)

  md = open(os.path.join(out, 'results.md')).read()
  for loss in ('softmax', 'sigmoid'):
    for batch in ('16', '64', '256'):
      runs = [r for r in sweep.runs if dict(r.cell) == {'loss.name': loss,
                                                        'train.batch_size': batch}]
      ok = [r for r in runs if sweep_lib.status(r) == 'finished']
      line = next(l for l in md.splitlines() if l.startswith(f'| {loss} | {batch} |'))
      assert f'| {len(ok)}/3 |' in line
      for metric in metrics:
        values = np.array([_metrics(r)[metric] for r in ok])
        expected = f'{values.mean():.3f} ± {values.std(ddof=1):.3f}'
        assert f'| {expected} |' in line, (line, expected)

  for metric in metrics:
    path = os.path.join(out, 'plots', sweep_lib.plot_file_name(metric))
    assert f'](plots/{os.path.basename(path)})' in md
    import matplotlib.image  # pylint: disable=g-import-not-at-top
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_first_numeric_axis_is_x():
  axes = (sweep_lib.Axis('loss.name', ('a', 'b'), ('a', 'b')),
          sweep_lib.Axis('eval.zeroshot', ('true',), (True,)),
          sweep_lib.Axis('train.batch_size', ('16',), (16,)))
  assert sweep_lib.x_axis(axes) == 2
  assert sweep_lib.x_axis(axes[:2]) == 0


@pytest.mark.slow
def test_end_to_end_resumes_half_done_run_and_skips_finished(tmp_path, shapes_small_dir,
                                                               monkeypatch):
  """Tiny real runs: the first invocation stops the softmax run after 2 of its 4 steps
  (train.max_steps_per_run) and skips the already finished sigmoid run; the second, through
  the command line, resumes it from its checkpoint to the end and writes the tables."""
  monkeypatch.setenv('XLA_FLAGS', '')   # one CPU device per run
  out = str(tmp_path / 'sweep')
  args = ['--config=' + TINY, '--grid=loss.name=softmax,sigmoid', '--seeds=1', f'--out={out}',
          f'--set=data.data_dir={shapes_small_dir}', '--set=train.num_steps=4',
          '--set=train.max_steps_per_run=2', '--set=eval.max_examples=32',
          '--set=checkpoint.every_steps=2']
  sweep = sweep_lib.plan(TINY, ['loss.name=softmax,sigmoid'], [a.split('=', 1)[1]
                                                               for a in args if 'set=' in a],
                         1, out)
  softmax, sigmoid = sweep.runs
  os.makedirs(sigmoid.workdir)
  finished = {'eval/test/zeroshot_top1': 0.25, 'eval/test_novel/zeroshot_top1': 0.5}
  with open(os.path.join(sigmoid.workdir, 'results.json'), 'w') as f:
    json.dump(finished, f)

  sweep_lib.run_sweep(sweep)
  assert sweep_lib.status(softmax) == 'incomplete'
  assert not os.path.exists(os.path.join(sigmoid.workdir, 'log.txt'))   # skipped

  done = subprocess.run([sys.executable, '-m', 'experiments.sweep', *args], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sweep_lib.status(softmax) == 'finished'
  log = open(os.path.join(softmax.workdir, 'log.txt')).read()
  assert 'Resuming from checkpoint at step 2' in log
  steps = [json.loads(l)['step'] for l in open(os.path.join(softmax.workdir, 'metrics.jsonl'))
           if 'train/loss' in l]
  assert steps == [2, 4]
  rows = {r['loss.name']: r for r in csv.DictReader(open(os.path.join(out, 'results.csv')))}
  assert float(rows['sigmoid']['eval/test/zeroshot_top1']) == 0.25
  assert rows['softmax']['status'] == 'finished' and rows['softmax']['eval/test/i2t_recall@1']
  assert '| softmax | 4 | 1/1 |' in open(os.path.join(out, 'results.md')).read()


def test_loss_ablation_grid_and_table(tmp_path):
  from experiments import loss_ablation  # pylint: disable=g-import-not-at-top
  sweep = loss_ablation.make_sweep(4096, ['16', '64', '256'], 2, 500, str(tmp_path))
  assert len(sweep.runs) == 2 * 3 * 2
  for run in sweep.runs:
    overrides = dict(run.overrides)
    assert overrides['loss.positives'] == 'pair' and overrides['eval.max_examples'] == '500'
    assert overrides['data.drop_color_prob'] == '0'  # the captions as they are
    assert run.num_steps * int(overrides['train.batch_size']) == 4096   # equal examples
  values = {run: [0.1 * i, 0.1 * i + 0.05] for i, run in enumerate(sweep.runs[:6])}
  summary = [{'values': (dict(r.cell)['loss.name'], dict(r.cell)['train.batch_size']),
              'steps': r.num_steps, **{m: values[r] for _, m in loss_ablation.METRICS}}
             for r in sweep.runs[:6]]
  lines = loss_ablation.table(summary).splitlines()
  assert lines[0].startswith('| batch | steps | zero-shot top-1, test_novel, softmax | '
                             'zero-shot top-1, test_novel, sigmoid |')
  row_64 = lines[3].split(' | ')
  softmax, sigmoid = np.array(values[sweep.runs[1]]), np.array(values[sweep.runs[4]])
  assert row_64[:4] == ['| 64', '64',
                        f'{100 * softmax.mean():.1f} ± {100 * softmax.std(ddof=1):.1f}',
                        f'{100 * sigmoid.mean():.1f} ± {100 * sigmoid.std(ddof=1):.1f}']
