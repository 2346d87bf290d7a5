"""Zero-shot top-1 by prompt template on real scanned digits whose captions vary in wording.

  python -m experiments.prompt_templates_digits [--steps 600] [--data data/digits_varied] \
      [--workdir runs/prompt_templates_digits]

Writes the digits folder with varied wordings (`make_digits_folder.py --wordings=varied`,
needs scikit-learn), trains `configs/clip_folder.py` on it as README shows
(data.image_size=32, train.num_steps=STEPS, templates left to the data), then scores the
final parameters' zero-shot top-1 on `test` with three template sets: the old default
'a photo of a {}.', the bare class name '{}', and the templates derived from the train
captions (the workdir's prompt_templates.json). Writes
experiments/results/prompt_templates_digits.json.
"""
import argparse
import json
import logging
import os
import platform
import time

from experiments import make_digits_folder
from vlm_jax import cli
from vlm_jax import models
from vlm_jax.data import datasets
from vlm_jax.eval import runner
from vlm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, 'experiments', 'results', 'prompt_templates_digits.json')
METRIC = 'eval/test/zeroshot_top1'


def machine() -> str:
  """'N CPU cores of MODEL' (the cores this process may use)."""
  model = platform.machine()
  if os.path.isfile('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), model)
  return f'{len(os.sched_getaffinity(0))} CPU cores of {model}, shared with other jobs'


def config(data: str, steps: int):
  c = cli._load_config_file(os.path.join(REPO, 'configs', 'clip_folder.py'))  # pylint: disable=protected-access
  c.data.path, c.data.image_size, c.train.num_steps = data, 32, steps
  return c


def zeroshot_top1(c, model, params, tokenizer, templates: tuple[str, ...]) -> float:
  """Zero-shot top-1 on `test` of `params` with `templates` (retrieval off)."""
  c = c.copy_and_resolve_references()
  c.eval.prompt_templates, c.eval.retrieval = templates, False
  return runner.evaluate(c, model, params, tokenizer)[METRIC]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--data', default='data/digits_varied')
  parser.add_argument('--workdir', default='runs/prompt_templates_digits')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--seed', type=int, default=0, help='seed of the caption wordings')
  args = parser.parse_args()
  if os.path.isdir(args.workdir) and os.listdir(args.workdir):
    raise SystemExit(f'error: {args.workdir} is not empty; remove it or pass another --workdir.')
  logging.getLogger().setLevel(logging.WARNING)
  scans, targets = make_digits_folder.load_scans()
  make_digits_folder.write_folder(args.data, scans, targets, 'varied', args.seed)
  c = config(args.data, args.steps)
  start = time.perf_counter()
  state, results = trainer.train_and_evaluate(c, args.workdir)
  wall_s = time.perf_counter() - start
  with open(os.path.join(args.workdir, runner.TEMPLATES_FILE)) as f:
    derived = json.load(f)
  model = models.build_model(c.model, text_max_len=c.data.max_text_len)
  tokenizer = datasets.load_tokenizer(c.data)
  top1 = {name: zeroshot_top1(c, model, state.params, tokenizer, templates)
          for name, templates in (('photo', ('a photo of a {}.',)), ('name', ('{}',)),
                                  ('captions', tuple(derived['templates'])))}
  record = {
      'command': f'python -m experiments.prompt_templates_digits --steps {args.steps} '
                 f'--seed {args.seed}',
      'machine': machine(),
      'steps': args.steps, 'train_and_eval_wall_s': round(wall_s, 1),
      'derived_templates': derived, 'zeroshot_top1': top1,
      'zeroshot_top1_at_training_end': results.get(METRIC),
  }
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, 'w') as f:
    json.dump(record, f, indent=2)
  print(json.dumps(record, indent=2))


if __name__ == '__main__':
  main()
