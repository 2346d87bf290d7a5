"""Evaluates the newest checkpoint of a workdir that verifies and writes `results.json` there.

  python -m vlm_jax.evaluate --config=configs/clip_shapes.py --workdir=runs/clip_shapes

Zero-shot from pretrained parameters (`python -m vlm_jax.convert --from=hf ...`), with or
without a --workdir to write results into:

  python -m vlm_jax.evaluate --config=configs/clip_vit_b16.py --config.init.pretrained=WORKDIR

Takes the multi-process flags of `vlm_jax.train` (see `vlm_jax/training/distributed.py`).
"""
import json
import logging
import os
import sys

from absl import flags

from vlm_jax import cli
from vlm_jax.training import cpu_backend
from vlm_jax.training import distributed

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run (with checkpoints/); '
                                'optional with --config.init.pretrained (results are written '
                                'there when given).')
distributed.define_flags()


def evaluate_workdir(config, workdir: str | None) -> dict:
  """Runs `config.eval` on the newest checkpoint in `workdir` that verifies (a damaged one is
  passed over and left in place; one line says which is used), or, when there is none, on the
  parameters of `config.init.pretrained`; writes results into `workdir` if given."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vlm_jax.eval import runner  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import checkpointing, pretrained, trainer, writers  # pylint: disable=g-import-not-at-top

  pretrained.apply_config(config)
  distributed.primary_first(lambda: datasets.ensure_built(config.data), 'build_data')
  tokenizer = datasets.load_tokenizer(config.data)
  trainer.resolve_config(config, tokenizer)
  checkpointer = checkpointing.Checkpointer(workdir, config) if workdir else None
  try:  # closed on errors too: an open one fails noisily at interpreter exit
    step = checkpointer.latest_step() if checkpointer else None
    if step is None and not config.init.pretrained:
      raise cli.UserError(f'No checkpoint in {checkpointer.directory}; train first with '
                          f'python -m vlm_jax.train --workdir={workdir}, or evaluate pretrained '
                          'parameters with --config.init.pretrained=WORKDIR')
    setup = trainer.Setup(config)
    if step is not None:
      step, state, _ = checkpointer.restore_latest(setup.abstract_state, read_only=True)
      print(checkpointer.chosen(step), file=sys.stderr)
    else:
      state, step = pretrained.load_into_state(config, setup.init_state(jax.random.key(0))), 0
  finally:
    if checkpointer:
      checkpointer.close()
  runner.record_prompt_templates(config, workdir)
  results = runner.evaluate(config, setup.model, state.params, tokenizer)
  if workdir and jax.process_index() == 0:
    writer = writers.MetricWriter(workdir)
    writer.write(step, results)
    writer.close()
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  config = cli.load_config(_CONFIG, sys.argv)
  cpu_backend.configure(config.parallel.cpu_tuning)  # before JAX creates its CPU client
  try:
    distributed.initialize_from_flags()  # before anything else uses JAX
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if not _WORKDIR.value and not config.init.pretrained:
    raise cli.UserError('--workdir is required (or --config.init.pretrained=WORKDIR to evaluate '
                        'pretrained parameters)')
  from vlm_jax.training import checkpointing, pretrained  # pylint: disable=g-import-not-at-top
  try:
    results = evaluate_workdir(config, _WORKDIR.value)
  except (checkpointing.CheckpointMismatchError, pretrained.PretrainedError, OSError) as e:
    raise cli.UserError(str(e)) from None
  for key, value in sorted(results.items()):
    print(f'{key}: {value:.4f}')


if __name__ == '__main__':
  cli.run(main)
