"""SigLIP's loss ablation on `shapes`: sigmoid against softmax contrastive loss across batch
sizes, at an equal number of training examples (Zhai et al., 2023, figure 2).

  python -m experiments.loss_ablation [--examples=16384] [--batch_sizes=16,32,64,128,256]
      [--seeds=3] [--eval_examples=1000] [--workdir=runs/loss_ablation]
      [--out=experiments/results/loss_ablation.md]

A sweep (experiments/sweep.py) of configs/siglip_shapes.py over loss.name x train.batch_size
with loss.positives='pair' (each image's own caption is its only positive, as in the paper)
and the captions as they are (data.drop_color_prob=0), so that the loss is the only difference between two runs of a batch size: both have SigLIP's
temperature init (log 10) and learnable bias (-10, which softmax cannot see: a constant added
to every logit of a row cancels). Every run trains on the same number of examples (the
paper's protocol, and equal compute up to the loss's B x B term): steps = examples / batch,
with the config's warmup fraction and cosine schedule. The runs go to WORKDIR (resumable:
the same command skips finished runs); the table of mean ± std over seeds goes to OUT, the
per-run numbers to OUT's .csv and a plot of the metrics against batch size to its .png.
"""
import logging
import os

from absl import flags

from experiments import sweep as sweep_lib
from experiments.ablation_utils import format_mean_std
from vlm_jax import cli

CONFIG = os.path.join(sweep_lib.REPO, 'configs', 'siglip_shapes.py')
# (column title, metric)
METRICS = (('zero-shot top-1, test_novel', 'eval/test_novel/zeroshot_top1'),
           ('zero-shot top-1, test', 'eval/test/zeroshot_top1'),
           ('i2t R@1, test', 'eval/test/i2t_recall@1'),
           ('t2i R@1, test', 'eval/test/t2i_recall@1'))
LOSSES = ('softmax', 'sigmoid')


def make_sweep(examples: int, batch_sizes: list[str], seeds: int, eval_examples: int,
               workdir: str, extra_sets: tuple[str, ...] = ()) -> sweep_lib.Sweep:
  return sweep_lib.plan(
      CONFIG, [f'loss.name={",".join(LOSSES)}', f'train.batch_size={",".join(batch_sizes)}'],
      ['loss.positives=pair', 'data.drop_color_prob=0', f'eval.max_examples={eval_examples}',
       'eval.matching=false',
       *extra_sets], seeds, workdir, examples=examples)


def table(summary: list[dict]) -> str:
  """Rows: batch sizes; per metric a softmax and a sigmoid column, in %."""
  by_cell = {cell['values']: cell for cell in summary}
  batches = list(dict.fromkeys(values[1] for values in by_cell))
  head = ['batch', 'steps'] + [f'{title}, {loss}' for title, _ in METRICS for loss in LOSSES]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for batch in batches:
    cells = [batch, str(by_cell[(LOSSES[0], batch)]['steps'])]
    for _, metric in METRICS:
      cells += [format_mean_std(by_cell[(loss, batch)][metric], 100, 1) for loss in LOSSES]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_plot(summary: list[dict], axes, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, panels = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
  for ax, (title, metric) in zip(panels, METRICS):
    sweep_lib.plot_metric(ax, summary, axes, metric, scale=100)
    ax.set_title(title + ' (%)', fontsize=10)
    ax.set_ylabel('')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_integer('examples', 16384, 'Training examples of every run.', lower_bound=1)
  flags.DEFINE_list('batch_sizes', ['16', '32', '64', '128', '256'], 'Global batch sizes.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per setting.', lower_bound=1)
  flags.DEFINE_integer('eval_examples', 1000, 'eval.max_examples per split (0: whole splits).',
                       lower_bound=0)
  flags.DEFINE_string('workdir', 'runs/loss_ablation', 'The sweep directory.')
  flags.DEFINE_string('out', 'experiments/results/loss_ablation.md',
                      'The Markdown table; .csv and .png are written beside it.')


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    sweep = make_sweep(f.examples, f.batch_sizes, f.seeds, f.eval_examples, f.workdir)
    sweep_lib.run_sweep(sweep)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  metrics = [m for _, m in METRICS]
  rows = sweep_lib.report(sweep, metrics)  # WORKDIR/results.{csv,md}, plots/
  summary = sweep_lib.summarize(rows, sweep.axes, metrics)
  base = os.path.splitext(f.out)[0]
  os.makedirs(os.path.dirname(f.out) or '.', exist_ok=True)
  sweep_lib.write_csv(rows, sweep.axes, base + '.csv')
  write_plot(summary, sweep.axes, base + '.png')
  done = [r for r in rows if r['status'] == 'finished']
  total_min = sum(r['wall_s'] or 0 for r in rows) / 60
  command = ('python -m experiments.loss_ablation '
             f'--examples={f.examples} --batch_sizes={",".join(f.batch_sizes)} '
             f'--seeds={f.seeds} --eval_examples={f.eval_examples}')
  with open(f.out, 'w') as md:
    md.write(
        '# Sigmoid vs softmax contrastive loss across batch sizes on `shapes`\n\n'
        f'`{command}`\n\n'
        'configs/siglip_shapes.py with `loss.positives=pair` and `data.drop_color_prob=0`, '
        'swept over `loss.name` and '
        '`train.batch_size` by experiments/sweep.py: the two losses share everything else '
        "(towers, SigLIP's temperature init log 10 and bias init -10, optimizer, schedule "
        f'shape). Budget: every run trains on {f.examples:,} examples (steps = '
        f'{f.examples:,} / batch), as the paper compares batch sizes at equal examples '
        'seen; the warmup is the config\'s 2.5% of the steps, then cosine decay. '
        f'Evaluation on the first {f.eval_examples or "all"} examples of `test` and all '
        f'of `test_novel`. Mean ± sample std over seeds 0..{f.seeds - 1} in %; '
        f'{len(done)} of {len(rows)} runs finished, {total_min:.0f} min of wall on 2 shared '
        'CPU cores. Per-run numbers: '
        f'[{os.path.basename(base)}.csv]({os.path.basename(base)}.csv).\n\n'
        f'{table(summary)}\n\n![metrics against batch size]({os.path.basename(base)}.png)\n')
  logging.info('loss ablation: wrote %s(.csv, .png)', f.out)
  print(table(summary))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
