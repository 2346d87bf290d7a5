"""The compositionality ablation: a dual encoder against each fusion layer on `shapes`.

  python -m experiments.fusion_ablation [--steps=1000] [--batch_size=64] [--seeds=0,1,2]
      [--models=clip,albef,vilt,flamingo,qformer] [--workdir=runs/fusion_ablation]
      [--out=experiments/results/fusion_ablation.md]

Every model trains from its config (configs/<model>_shapes.py; `clip` is the dual encoder of
configs/clip_shapes.py) at the same budget: the same steps, global batch, learning rate and
towers, one run per seed. A finished run (its workdir holds `ablation.json`) is read, not
re-run, and an unfinished one resumes from its checkpoint, so an interrupted ablation goes
on where it stopped. Writes a Markdown table of mean
± std over seeds (relation and attribute accuracy on `test`, retrieval R@1, zero-shot top-1
on `test_novel`, parameters, train step time), the per-run numbers as JSON beside it, and a
bar chart of relation accuracy as SVG.

Relation accuracy: the canonical caption of a two-object image against the same caption
with the objects exchanged ("a red circle above a blue star" vs "a blue star above a red
circle"); attribute accuracy: against the caption with the colours exchanged; position
accuracy: a caption naming a place against its mirror ('on the left' vs 'on the right'), on
one-object scenes (grounding) and two-object ones (binding). Dual encoders score captions by
cosine similarity, fusion models by their ITM head. Chance is 50%.

With `--curves`, two more ALBEF runs per seed record position accuracy every
`--curve_every` steps: ITM alone (no MLM, no curriculum) and ITM with the grounding
objectives of configs/fusion_shapes.py; they are drawn as `<out>_curves.png`.

The Markdown file keeps everything below its `PROSE_MARKER` line from one run to the next:
the reading of the numbers is written by hand, every number above it by this script.
"""
import json
import logging
import math
import os
import time

import jax
from absl import flags

from experiments.ablation_utils import bar_chart_svg, mean_std, step_time_ms
from vlm_jax import cli
from vlm_jax.training import trainer

MODELS = {'clip': 'clip_shapes', 'albef': 'albef_shapes', 'vilt': 'vilt_shapes',
          'flamingo': 'flamingo_shapes', 'qformer': 'qformer_shapes'}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = flags.DEFINE_integer('steps', 1000, 'Train steps of every run.', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch of every run.', lower_bound=1)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; one run per model and seed.')
_MODELS = flags.DEFINE_list('models', list(MODELS), f'Models, from {sorted(MODELS)}.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/fusion_ablation', 'Runs go to '
                               'WORKDIR/<model>_seed<seed>.')
_OUT = flags.DEFINE_string('out', 'experiments/results/fusion_ablation.md',
                           'The Markdown table; .json and .svg are written beside it.')
_EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 0, 'eval.max_examples (0: whole '
                                      'splits).', lower_bound=0)
_CURVES = flags.DEFINE_bool('curves', False, 'Also run ALBEF with ITM alone and with the '
                            'grounding objectives, evaluating position accuracy as it trains.')
_CURVE_EVERY = flags.DEFINE_integer('curve_every', 100, 'Steps between the curves\' '
                                    'evaluations.', lower_bound=1)

PROSE_MARKER = '<!-- Below this line: prose, kept by experiments/fusion_ablation.py. -->'
CURVES = {'ITM alone': 'itm_alone', 'ITM + grounding': 'itm_grounding'}

# (column title, metric key, scale); fusion models' retrieval R@1 is re-ranked by ITM.
COLUMNS = (
    ('relation acc. (test)', 'eval/test/relation_accuracy', 100),
    ('attribute acc. (test)', 'eval/test/attribute_accuracy', 100),
    ('position acc. (test)', 'eval/test/position_accuracy', 100),
    ('position, one object', 'eval/test/position_accuracy_one_object', 100),
    ('position, two objects', 'eval/test/position_accuracy_two_objects', 100),
    ('i2t R@1 (test)', 'eval/test/i2t_recall@1', 100),
    ('i2t R@1, ITM re-ranked', 'eval/test/i2t_rerank_recall@1', 100),
    ('zero-shot top-1 (test_novel)', 'eval/test_novel/zeroshot_top1', 100),
)


def run_config(model: str, seed: int, steps: int, batch_size: int, eval_examples: int):
  config = cli._load_config_file(os.path.join(REPO, 'configs', MODELS[model] + '.py'))  # pylint: disable=protected-access
  config.seed = seed
  config.train.num_steps, config.train.batch_size = steps, batch_size
  config.checkpoint.every_steps = max(steps // 2, 1)
  config.eval.max_examples = eval_examples
  return config


def curve_config(curve: str, seed: int, steps: int, batch_size: int, eval_examples: int,
                 every: int):
  """ALBEF for a learning curve: 'itm_alone' (ITM on the dataset's false captions and the
  batch's negatives, no MLM, no curriculum) or 'itm_grounding' (the config as it is),
  evaluated on `test`'s matching pairs every `every` steps."""
  config = run_config('albef', seed, steps, batch_size, eval_examples)
  if curve == 'itm_alone':
    config.loss.weights.itc = config.loss.weights.mlm = 0.0
    config.data.curriculum.steps = 0
  config.eval.every_steps, config.eval.splits = every, ('test',)
  config.eval.zeroshot = config.eval.retrieval = False
  config.eval.rerank_k = 0
  return config


def run_one(model: str, seed: int, curve: str = '') -> dict:
  """Trains (or reads) one run; returns its metrics plus parameters, step time, wall time
  and, for a curve, `curve`: [(step, position accuracy, ... one object, ... two)]."""
  name = f'curve_{curve}' if curve else model
  workdir = os.path.join(_WORKDIR.value, f'{name}_seed{seed}')
  summary_path = os.path.join(workdir, 'ablation.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  if curve:
    config = curve_config(curve, seed, _STEPS.value, _BATCH.value, _EVAL_EXAMPLES.value,
                          _CURVE_EVERY.value)
  else:
    config = run_config(model, seed, _STEPS.value, _BATCH.value, _EVAL_EXAMPLES.value)
  start = time.perf_counter()
  state, results = trainer.train_and_evaluate(config, workdir)
  summary = dict(results, model=model, seed=seed, steps=_STEPS.value, batch_size=_BATCH.value,
                 params=sum(x.size for x in jax.tree.leaves(state.params)),
                 step_time_ms=step_time_ms(workdir), wall_s=time.perf_counter() - start)
  if curve:
    summary['curve'] = [[row['step']] + [row.get(f'eval/test/position_accuracy{suffix}')
                                         for suffix in ('', '_one_object', '_two_objects')]
                        for row in _metric_rows(workdir) if 'eval/test/position_accuracy' in row]
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def _metric_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def curves_png(curves: dict[str, list[dict]], path: str) -> None:
  """Position accuracy (one object, two objects) against step for each curve, every seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for (title, runs), color in zip(curves.items(), ('tab:gray', 'tab:blue')):
    for r, run in enumerate(runs):
      steps = [row[0] for row in run['curve']]
      for column, style, what in ((2, '-', 'one object'), (3, '--', 'two objects')):
        ax.plot(steps, [100 * row[column] for row in run['curve']], style, color=color,
                label=f'{title}, {what}' if r == 0 else None)
  ax.axhline(50, color='black', linewidth=0.5)
  ax.set_xlabel('step')
  ax.set_ylabel('position accuracy by ITM on test (%)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curves_table(curves: dict[str, list[dict]]) -> str:
  """Markdown: position accuracy (one object / two objects) at each evaluated step."""
  steps = sorted({row[0] for runs in curves.values() for run in runs for row in run['curve']})
  lines = ['| step | ' + ' | '.join(f'{t}: one object | {t}: two objects' for t in curves) +
           ' |', '|' + '---|' * (1 + 2 * len(curves))]
  for step in steps:
    cells = [str(step)]
    for runs in curves.values():
      for column in (2, 3):
        values = [row[column] for run in runs for row in run['curve'] if row[0] == step]
        mean, std = mean_std(values)
        cells.append('—' if math.isnan(mean) else f'{100 * mean:.1f} ± {100 * std:.1f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _kept_prose(path: str) -> str:
  """The hand-written part of an existing results file (below PROSE_MARKER), or ''."""
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    text = f.read()
  return text.split(PROSE_MARKER, 1)[1].lstrip('\n') if PROSE_MARKER in text else ''


def table(runs: list[dict], models: list[str]) -> str:
  head = ['model', *[c[0] for c in COLUMNS], 'parameters', 'step time (ms)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for model in models:
    rows = [r for r in runs if r['model'] == model]
    if not rows:
      continue
    cells = [f'{model} ({MODELS[model]})']
    for _, key, scale in COLUMNS:
      mean, std = mean_std([r.get(key) for r in rows])
      cells.append('—' if math.isnan(mean) else f'{scale * mean:.1f} ± {scale * std:.1f}')
    cells.append(f'{rows[0]["params"]:,}')
    mean, std = mean_std([r['step_time_ms'] for r in rows])
    cells.append(f'{mean:.0f} ± {std:.0f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  models = list(_MODELS.value)
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise ValueError(f'Unknown --models {unknown}; accepted: {sorted(MODELS)}.')
  seeds = [int(s) for s in _SEEDS.value]
  runs = []
  curves = {title: [] for title in CURVES} if _CURVES.value else {}
  for seed in seeds:
    for model in models:
      logging.info('ablation: %s seed %d', model, seed)
      runs.append(run_one(model, seed))
    for title in curves:
      logging.info('ablation: curve %s seed %d', title, seed)
      curves[title].append(run_one('albef', seed, CURVES[title]))
  base = os.path.splitext(_OUT.value)[0]
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(base + '.json', 'w') as f:
    json.dump({'runs': runs, 'curves': curves}, f, indent=2, sort_keys=True)
  with open(base + '.svg', 'w') as f:
    bars = [(m, [r.get('eval/test/relation_accuracy') for r in runs if r['model'] == m])
            for m in models]
    f.write(bar_chart_svg(bars, 'Relation accuracy on test (%), chance 50%'))
  command = ('python -m experiments.fusion_ablation '
             f'--steps={_STEPS.value} --batch_size={_BATCH.value} '
             f'--eval_examples={_EVAL_EXAMPLES.value} --seeds={",".join(map(str, seeds))} '
             f'--models={",".join(models)}' +
             (f' --curves --curve_every={_CURVE_EVERY.value}' if curves else ''))
  prose = _kept_prose(_OUT.value)
  text = (f'# Fusion ablation on `shapes`\n\n`{command}`\n\n'
          f'{_STEPS.value} steps at batch {_BATCH.value} per run, each model\'s config '
          f'otherwise as it is (configs/<model>_shapes.py), mean ± std over seeds {seeds}. '
          'Relation / attribute accuracy: true caption vs objects / colours exchanged; '
          'position: a caption naming a place vs its mirror (chance 50% each), by cosine for '
          'the dual encoder and by ITM for fusion models. Step time: median train step on 2 '
          'CPU cores.\n\n'
          f'{table(runs, models)}\n\n![relation accuracy]({os.path.basename(base)}.svg)\n')
  if curves:
    curves_png(curves, base + '_curves.png')
    text += ('\n## Learning curves: ALBEF, ITM alone vs ITM + grounding\n\nPosition '
             'accuracy by ITM on `test` (%) as training goes on:\n\n'
             f'{curves_table(curves)}\n\n![curves]({os.path.basename(base)}_curves.png)\n')
  with open(_OUT.value, 'w') as f:
    f.write(f'{text}\n{PROSE_MARKER}\n\n{prose}')
  print(table(runs, models))


if __name__ == '__main__':
  cli.run(main)
