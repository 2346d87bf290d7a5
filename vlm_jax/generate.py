"""Captions an image, or answers a question about it, with a trained captioner (CoCa).

  python -m vlm_jax.generate --workdir=runs/coca_shapes --image=scene.png
  python -m vlm_jax.generate --workdir=runs/coca_shapes --image=scene.png
      --question="what color is the circle?"
  python -m vlm_jax.generate --workdir=runs/coca_shapes --image=scene.png --beams=4
  python -m vlm_jax.generate --workdir=runs/coca_shapes --image=scene.png
      --temperature=0.8 --top_k=10 --top_p=0.9

Reads the run's config.json, its tokenizer and its newest checkpoint that verifies (one line
on stderr says which; a damaged one is passed over and left in place); resizes the image to
the model's input size and normalises it as the input pipeline does; prints the caption (or
the answer) on one line. Greedy by default, beam search with --beams > 1, sampling with
--temperature > 0.
"""
import logging
import os
import sys

from absl import flags

from vlm_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a captioner training run (with '
                               'config.json and checkpoints/).')
_IMAGE = flags.DEFINE_string('image', None, 'Image file to caption (any format PIL reads).')
_QUESTION = flags.DEFINE_string('question', '', 'A question about the image; empty (or only '
                                'spaces) = caption the image.')
_BEAMS = flags.DEFINE_integer('beams', 1, 'Beam search with this many beams; 1 = greedy.',
                              lower_bound=1)
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam search: scores are summed '
                                     'log-probs / generated tokens ** length_penalty.',
                                     lower_bound=0.0)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sample at this temperature; 0 = no '
                                  'sampling (greedy or beam search).', lower_bound=0.0)
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sampling: keep the k most likely tokens; 0 = all.',
                              lower_bound=0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sampling: keep the most likely tokens up to this '
                            'probability mass; 1 = all.', lower_bound=0.0, upper_bound=1.0)
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Longest sequence (prompt included); 0 = the '
                                "model's text positions.", lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')

CAPTIONERS = ('coca', 'blip2', 'causal_lm')  # model names whose models generate text


def load_image(path: str, size: int):
  """uint8 [size, size, 3] RGB pixels of the image file at `path`, resized (bicubic)."""
  from vlm_jax.inference import generation  # pylint: disable=g-import-not-at-top
  try:
    return generation.load_image(path, size)
  except ValueError as e:
    raise cli.UserError(str(e)) from None


def read_captioner_config(workdir: str):
  """The config of a captioner workdir; a UserError for anything else."""
  from vlm_jax.convert import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise cli.UserError(f'No workdir at {workdir!r}.')
  try:
    config = workdir_lib.read_config(workdir)
  except workdir_lib.WorkdirError as e:
    raise cli.UserError(str(e)) from None
  if config.model.name not in CAPTIONERS:
    raise cli.UserError(f'{workdir} holds a {config.model.name!r} model, which does not '
                        f'generate text; vlm_jax.generate needs a captioner '
                        f'(model.name: {", ".join(CAPTIONERS)}).')
  return config


def restore_captioner(workdir: str, config):
  """(model, params, tokenizer) of the newest checkpoint in `workdir` that verifies (a damaged
  one is passed over and left in place; one line on stderr says which is used)."""
  from vlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from vlm_jax.training import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = datasets.load_tokenizer(config.data)
  except (OSError, ValueError) as e:
    raise cli.UserError(f'Cannot load the tokenizer of {workdir}: {e}') from None
  trainer.resolve_config(config, tokenizer)
  checkpointer = checkpointing.Checkpointer(workdir, config)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise cli.UserError(f'No checkpoint in {checkpointer.directory}; train first with '
                          f'python -m vlm_jax.train --workdir={workdir}')
    setup = trainer.Setup(config)
    step, state, _ = checkpointer.restore_latest(setup.abstract_state, read_only=True)
    print(checkpointer.chosen(step), file=sys.stderr)
  except (checkpointing.CheckpointMismatchError, OSError) as e:
    raise cli.UserError(str(e)) from None
  finally:
    checkpointer.close()
  return setup.model, state.params, tokenizer


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  if not _WORKDIR.value or not _IMAGE.value:
    raise cli.UserError('--workdir and --image are required, e.g. '
                        '--workdir=runs/coca_shapes --image=scene.png')
  if not os.path.isfile(_IMAGE.value):
    raise cli.UserError(f'No image file at {_IMAGE.value!r}.')
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlm_jax.inference import generation  # pylint: disable=g-import-not-at-top
  options = generation.DecodeOptions(
      beams=_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      seed=_SEED.value)
  try:
    options.check()
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  config = read_captioner_config(_WORKDIR.value)
  pixels = load_image(_IMAGE.value, config.data.image_size)  # before the slow restore
  images = pipeline.normalize_images(pixels[None], config.data)  # [1, S, S, 3]
  model, params, tokenizer = restore_captioner(_WORKDIR.value, config)
  try:
    generator = generation.Generator(
        model, params, tokenizer, _MAX_LEN.value or generation.generation_max_len(config),
        batch_size=1, parallel_cfg=config.parallel, options=options)
    if _QUESTION.value.strip():
      text, = generator.answers(images, [_QUESTION.value.strip()])
    else:
      text, = generator.captions(images)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  if not text.strip():
    print('notice: the model generated an empty text (an end-of-sequence token first); it may '
          'need more training, or try --beams=4 or sampling (--temperature=0.8).',
          file=sys.stderr)
  print(text)


if __name__ == '__main__':
  cli.run(main)
