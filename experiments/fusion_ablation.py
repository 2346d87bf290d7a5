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
circle"); attribute accuracy: against the caption with the colours exchanged. Dual encoders
score captions by cosine similarity, fusion models by their ITM head. Chance is 50%.
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

# (column title, metric key, scale); fusion models' retrieval R@1 is re-ranked by ITM.
COLUMNS = (
    ('relation acc. (test)', 'eval/test/relation_accuracy', 100),
    ('attribute acc. (test)', 'eval/test/attribute_accuracy', 100),
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


def run_one(model: str, seed: int) -> dict:
  """Trains (or reads) one run; returns its metrics plus parameters, step time, wall time."""
  workdir = os.path.join(_WORKDIR.value, f'{model}_seed{seed}')
  summary_path = os.path.join(workdir, 'ablation.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  config = run_config(model, seed, _STEPS.value, _BATCH.value, _EVAL_EXAMPLES.value)
  start = time.perf_counter()
  state, results = trainer.train_and_evaluate(config, workdir)
  summary = dict(results, model=model, seed=seed, steps=_STEPS.value, batch_size=_BATCH.value,
                 params=sum(x.size for x in jax.tree.leaves(state.params)),
                 step_time_ms=step_time_ms(workdir), wall_s=time.perf_counter() - start)
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary


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
  for seed in seeds:
    for model in models:
      logging.info('ablation: %s seed %d', model, seed)
      runs.append(run_one(model, seed))
  base = os.path.splitext(_OUT.value)[0]
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(base + '.json', 'w') as f:
    json.dump(runs, f, indent=2, sort_keys=True)
  with open(base + '.svg', 'w') as f:
    bars = [(m, [r.get('eval/test/relation_accuracy') for r in runs if r['model'] == m])
            for m in models]
    f.write(bar_chart_svg(bars, 'Relation accuracy on test (%), chance 50%'))
  command = ('python -m experiments.fusion_ablation '
             f'--steps={_STEPS.value} --batch_size={_BATCH.value} '
             f'--eval_examples={_EVAL_EXAMPLES.value} --seeds={",".join(map(str, seeds))} '
             f'--models={",".join(models)}')
  with open(_OUT.value, 'w') as f:
    f.write(f'# Fusion ablation on `shapes`\n\n`{command}`\n\n'
            f'{_STEPS.value} steps at batch {_BATCH.value} per run, towers of '
            'configs/clip_shapes.py, '
            f'mean ± std over seeds {seeds}. Relation / attribute accuracy: true caption vs '
            'objects / colours exchanged (chance 50%), by cosine for the dual encoder and by '
            'ITM for fusion models. Step time: median train step on 2 CPU cores.\n\n'
            f'{table(runs, models)}\n\n![relation accuracy]({os.path.basename(base)}.svg)\n')
  print(table(runs, models))


if __name__ == '__main__':
  cli.run(main)
