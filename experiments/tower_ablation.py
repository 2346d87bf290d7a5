"""The image-tower ablation on `shapes`: ViT against ResNet, and ViT patch dropout (FLIP), at
an equal wall-clock budget.

  python -m experiments.tower_ablation [--budget_s=150] [--batch_size=128] [--seeds=0,1,2]
      [--settings=vit,resnet,vit_pd50,vit_pd75] [--workdir=runs/tower_ablation]
      [--out=experiments/results/tower_ablation.md]

Settings: `vit` (configs/clip_shapes.py), `resnet` (configs/clip_resnet_shapes.py, a ResNet
image tower of about the ViT's parameter count), `vit_pd50` / `vit_pd75` (the ViT with
model.image.patch_dropout 0.5 / 0.75). Every run has the same text tower, global batch and
learning-rate schedule shape; what is equal is the training time. A calibration first
times each setting's train step in this process (median over interleaved rounds, so that a
shared machine's load falls on all settings alike) and gives each setting the steps that
fit `--budget_s` seconds; the steps each got are in the table. The calibration is saved in
WORKDIR/calibration.json and reused, and a finished run (its workdir holds `ablation.json`)
is read, not re-run, so an interrupted ablation goes on where it stopped.

Writes a Markdown table of mean ± std over seeds (zero-shot top-1 on `test_novel` and
`test`, retrieval R@1 on `test`, steps, step time, the image tower's train-step GFLOPs from
XLA's cost analysis, parameters), the per-run numbers as JSON beside it, and a bar chart of
zero-shot top-1 on `test_novel` as SVG.
"""
import json
import logging
import math
import os
import statistics
import time

import jax
import numpy as np
from absl import flags

from experiments.ablation_utils import bar_chart_svg, mean_std, step_time_ms
from vlm_jax import cli
from vlm_jax import models
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.encoders.cost import tower_train_flops
from vlm_jax.training import trainer

# setting -> (config file, model.image overrides)
SETTINGS = {'vit': ('clip_shapes', {}), 'resnet': ('clip_resnet_shapes', {}),
            'vit_pd50': ('clip_shapes', {'patch_dropout': 0.5}),
            'vit_pd75': ('clip_shapes', {'patch_dropout': 0.75})}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUDGET = flags.DEFINE_float('budget_s', 150.0, 'Training time of every run in seconds: a '
                             'setting gets budget_s / (its calibrated step time) steps.',
                             lower_bound=1.0)
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch of every run.', lower_bound=1)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; one run per setting and seed.')
_SETTINGS = flags.DEFINE_list('settings', list(SETTINGS), f'From {sorted(SETTINGS)}.')
_CALIBRATION = flags.DEFINE_integer('calibration_steps', 10, 'Timed steps per setting in each '
                                    'of 3 interleaved calibration rounds.', lower_bound=1)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/tower_ablation', 'Runs go to '
                               'WORKDIR/<setting>_seed<seed>.')
_OUT = flags.DEFINE_string('out', 'experiments/results/tower_ablation.md',
                           'The Markdown table; .json and .svg are written beside it.')
_EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 0, 'eval.max_examples (0: whole '
                                      'splits).', lower_bound=0)

# (column title, metric key, scale)
COLUMNS = (
    ('zero-shot top-1 (test_novel)', 'eval/test_novel/zeroshot_top1', 100),
    ('zero-shot top-1 (test)', 'eval/test/zeroshot_top1', 100),
    ('i2t R@1 (test)', 'eval/test/i2t_recall@1', 100),
    ('t2i R@1 (test)', 'eval/test/t2i_recall@1', 100),
)


def base_config(setting: str, seed: int = 0):
  """The setting's config at the ablation's batch (steps still the config's)."""
  name, image = SETTINGS[setting]
  config = cli._load_config_file(  # pylint: disable=protected-access
      os.path.join(REPO, 'configs', name + '.py'))
  config.seed = seed
  config.model.image.update(image)
  config.train.batch_size = _BATCH.value
  config.eval.max_examples = _EVAL_EXAMPLES.value
  return config


def _timer(setting: str, tokenizer, host_batch: dict):
  """A function that runs n train steps of `setting` and returns their times (s)."""
  config = base_config(setting)
  trainer.resolve_config(config, tokenizer)
  setup = trainer.Setup(config)
  state = setup.init_state(jax.random.key(0))
  batch, rng = setup.device_batch(host_batch), jax.random.key(1)
  state, metrics = setup.step(state, batch, rng)  # compile
  jax.block_until_ready(metrics)

  def run(n: int) -> list[float]:
    nonlocal state
    times = []
    for _ in range(n):
      start = time.perf_counter()
      state, metrics = setup.step(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return times

  return run


def calibrate(settings: list[str]) -> dict[str, float]:
  """Median train step time (s) of each setting on one real batch, in 3 interleaved rounds."""
  data_cfg = base_config(settings[0]).data
  datasets.ensure_built(data_cfg)
  tokenizer = datasets.load_tokenizer(data_cfg)
  host_batch = next(pipeline.make_train_iterator(data_cfg, tokenizer, _BATCH.value, seed=0))
  timers = {setting: _timer(setting, tokenizer, host_batch) for setting in settings}
  times = {setting: [] for setting in settings}
  for _ in range(3):
    for setting in settings:
      times[setting] += timers[setting](_CALIBRATION.value)
  return {setting: statistics.median(t) for setting, t in times.items()}


def image_tower_gflops(setting: str) -> float:
  """GFLOPs of the setting's image tower's train step (forward and backward) at the batch."""
  config = base_config(setting)
  tower = models.build_image_tower(config.model)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((_BATCH.value, size, size, 3), np.float32)
  return tower_train_flops(tower, images) / 1e9


def run_one(setting: str, seed: int, steps: int, calibrated_ms: float) -> dict:
  """Trains (or reads) one run; returns its metrics, parameters, step times and wall time."""
  workdir = os.path.join(_WORKDIR.value, f'{setting}_seed{seed}')
  summary_path = os.path.join(workdir, 'ablation.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  config = base_config(setting, seed)
  config.train.num_steps = steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
  config.checkpoint.every_steps = max(steps // 2, 1)
  start = time.perf_counter()
  state, results = trainer.train_and_evaluate(config, workdir)
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  image_params = count({k: v for k, v in state.params.items() if k.startswith('image')})
  summary = dict(results, setting=setting, seed=seed, steps=steps, batch_size=_BATCH.value,
                 budget_s=_BUDGET.value, calibrated_step_ms=calibrated_ms,
                 params=count(state.params), image_params=image_params,
                 step_time_ms=step_time_ms(workdir), wall_s=time.perf_counter() - start,
                 image_tower_gflops=image_tower_gflops(setting))
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def table(runs: list[dict], settings: list[str]) -> str:
  head = ['setting', *[c[0] for c in COLUMNS], 'steps in budget', 'calibrated step (ms)',
          'step time in the runs (ms)', 'image tower train GFLOPs / step', 'image parameters',
          'parameters']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for setting in settings:
    rows = [r for r in runs if r['setting'] == setting]
    if not rows:
      continue
    name, image = SETTINGS[setting]
    options = ', '.join(f'{k}={v}' for k, v in image.items())
    cells = [f'{setting} ({name}{", " + options if options else ""})']
    for _, key, scale in COLUMNS:
      mean, std = mean_std([r.get(key) for r in rows])
      cells.append('—' if math.isnan(mean) else f'{scale * mean:.1f} ± {scale * std:.1f}')
    cells.append(str(rows[0]['steps']))
    cells.append(f'{rows[0]["calibrated_step_ms"]:.0f}')
    mean, std = mean_std([r['step_time_ms'] for r in rows])
    cells.append(f'{mean:.0f} ± {std:.0f}')
    cells.append(f'{rows[0]["image_tower_gflops"]:.1f}')
    cells.append(f'{rows[0]["image_params"]:,}')
    cells.append(f'{rows[0]["params"]:,}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  settings = list(_SETTINGS.value)
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f'Unknown --settings {unknown}; accepted: {sorted(SETTINGS)}.')
  seeds = [int(s) for s in _SEEDS.value]
  os.makedirs(_WORKDIR.value, exist_ok=True)
  calibration_path = os.path.join(_WORKDIR.value, 'calibration.json')
  calibration = {}
  if os.path.exists(calibration_path):
    with open(calibration_path) as f:
      calibration = json.load(f)
  missing = [s for s in settings if s not in calibration]
  if missing:
    calibration.update(calibrate(missing))
    with open(calibration_path, 'w') as f:
      json.dump(calibration, f, indent=2, sort_keys=True)
  steps = {s: max(int(_BUDGET.value / calibration[s]), 1) for s in settings}
  logging.info('ablation: calibrated step times %s -> steps %s', calibration, steps)
  runs = []
  for seed in seeds:
    for setting in settings:
      logging.info('ablation: %s seed %d, %d steps', setting, seed, steps[setting])
      runs.append(run_one(setting, seed, steps[setting], 1000 * calibration[setting]))
  base = os.path.splitext(_OUT.value)[0]
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(base + '.json', 'w') as f:
    json.dump(runs, f, indent=2, sort_keys=True)
  with open(base + '.svg', 'w') as f:
    bars = [(s, [r.get('eval/test_novel/zeroshot_top1') for r in runs if r['setting'] == s])
            for s in settings]
    f.write(bar_chart_svg(bars, 'Zero-shot top-1 on test_novel (%), chance 2.5%',
                          reference=2.5))
  command = ('python -m experiments.tower_ablation '
             f'--budget_s={_BUDGET.value:g} --batch_size={_BATCH.value} '
             f'--eval_examples={_EVAL_EXAMPLES.value} --seeds={",".join(map(str, seeds))} '
             f'--settings={",".join(settings)}')
  with open(_OUT.value, 'w') as f:
    f.write(f'# Image-tower ablation on `shapes`\n\n`{command}`\n\n'
            f'Every run trains for the same time, {_BUDGET.value:g} s of steps at batch '
            f'{_BATCH.value}: each setting gets the steps that its calibrated step time '
            'fits in the budget (median of 3 interleaved rounds in one process, so that the '
            'load of a shared machine falls on every setting alike). Text tower and '
            f'schedule of configs/clip_shapes.py; mean ± std over seeds {seeds}. Step time in '
            'the runs: their median train step (2 shared CPU cores). GFLOPs: XLA\'s '
            'cost analysis of the image tower\'s forward and backward pass in training mode, '
            'at the run\'s batch. Image parameters: the tower and its projection.\n\n'
            f'{table(runs, settings)}\n\n'
            f'![zero-shot top-1 on test_novel]({os.path.basename(base)}.svg)\n')
  print(table(runs, settings))


if __name__ == '__main__':
  cli.run(main)
