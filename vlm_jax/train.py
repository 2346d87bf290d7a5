"""Trains a model from a config, evaluates at the end, resumes from the workdir's checkpoints.

  python -m vlm_jax.train --config=configs/clip_shapes.py --workdir=runs/clip_shapes \
      [--config.train.num_steps=2000 ...]
"""
import logging
import sys

from absl import flags

from vlm_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')


def main(argv: list[str]) -> None:
  del argv
  config = cli.load_config(_CONFIG, sys.argv)
  if not _WORKDIR.value:
    raise cli.UserError('--workdir is required, e.g. --workdir=runs/clip_shapes')
  logging.getLogger().setLevel(logging.INFO)
  from vlm_jax.training import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (checkpointing.CheckpointMismatchError, OSError, FloatingPointError) as e:
    raise cli.UserError(str(e)) from None


if __name__ == '__main__':
  cli.run(main)
