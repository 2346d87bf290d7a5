"""Trains a model from a config, evaluates at the end, resumes from the workdir's checkpoints.

  python -m vlm_jax.train --config=configs/clip_shapes.py --workdir=runs/clip_shapes \
      [--config.train.num_steps=2000 ...]

Multi-process (one process per host, or several on one machine): add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to each process's command
(SLURM steps and, with VLM_JAX_DISTRIBUTED=1, TPU pods are detected without flags); see
`vlm_jax/training/distributed.py`.
"""
import logging
import sys

from absl import flags

from vlm_jax import cli
from vlm_jax.training import cpu_backend
from vlm_jax.training import distributed

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
distributed.define_flags()


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  config = cli.load_config(_CONFIG, sys.argv)
  cpu_backend.configure(config.parallel.cpu_tuning)  # before JAX creates its CPU client
  try:
    distributed.initialize_from_flags()  # before anything else uses JAX
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if not _WORKDIR.value:
    raise cli.UserError('--workdir is required, e.g. --workdir=runs/clip_shapes')
  from vlm_jax.training import checkpointing, pretrained, trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (checkpointing.CheckpointMismatchError, pretrained.PretrainedError, OSError,
          FloatingPointError) as e:
    raise cli.UserError(str(e)) from None


if __name__ == '__main__':
  cli.run(main)
