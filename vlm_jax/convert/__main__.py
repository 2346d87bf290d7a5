"""Converts Hugging Face checkpoints to pretrained workdirs and back.

  python -m vlm_jax.convert --from=hf --src=HF_DIR --dst=WORKDIR
  python -m vlm_jax.train --config=... --workdir=RUN --config.init.pretrained=WORKDIR
  python -m vlm_jax.convert --to=hf --src=WORKDIR --dst=HF_DIR

WORKDIR holds config.json, params/ (orbax) and the tokenizer; `--to=hf` also takes a training
workdir (its latest checkpoint). Families: CLIP, SigLIP, ViT, BERT, the BLIP-2 Q-Former
(see vlm_jax/convert).
"""
import logging
import os

from absl import flags

from vlm_jax import cli

_FROM = flags.DEFINE_enum('from', None, ['hf'], 'Import: --src is a Hugging Face checkpoint '
                          'folder (config.json, model.safetensors, tokenizer files); --dst '
                          'becomes a vlm_jax workdir for --config.init.pretrained.')
_TO = flags.DEFINE_enum('to', None, ['hf'], 'Export: --src is a vlm_jax workdir (converted or '
                        'trained); --dst becomes a Hugging Face folder that transformers loads.')
_SRC = flags.DEFINE_string('src', None, 'The folder or workdir to convert.')
_DST = flags.DEFINE_string('dst', None, 'Where to write; must not exist or be empty.')
_FAMILY = flags.DEFINE_enum('family', '', ['', 'clip', 'siglip', 'vit', 'bert',
                                               'blip_2_qformer'],
                            'With --to=hf: the Hugging Face architecture to write; default: '
                            'from the model (siglip for a MAP-pooled dual encoder, else clip).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Allow a non-empty --dst (files there are '
                               'replaced).')


def _check_args() -> None:
  if bool(_FROM.value) == bool(_TO.value):
    raise cli.UserError('give exactly one of --from=hf (import) and --to=hf (export)')
  if not _SRC.value or not _DST.value:
    raise cli.UserError('--src and --dst are required')
  if not os.path.isdir(_SRC.value):
    raise cli.UserError(f'--src={_SRC.value} is not a directory')
  if os.path.isdir(_DST.value) and os.listdir(_DST.value) and not _OVERWRITE.value:
    raise cli.UserError(f'--dst={_DST.value} is not empty; choose another or pass --overwrite')


def import_folder(src: str, dst: str, overwrite: bool = False) -> str:
  """Hugging Face folder -> pretrained workdir; returns a one-line summary."""
  from vlm_jax.convert import hf, workdir  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = hf.import_hf(src)
  if overwrite and os.path.isdir(os.path.join(dst, workdir.PARAMS)):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.path.join(dst, workdir.PARAMS))
  workdir.save(dst, config, params, tokenizer)
  tok = f', tokenizer of {tokenizer.vocab_size} tokens' if tokenizer else ''
  return (f'{src} -> {dst}: {config.model.name}, {hf.count_params(params):,} parameters'
          f'{tok}')


def export_workdir(src: str, dst: str, family: str = '') -> str:
  """Workdir -> Hugging Face folder; returns a one-line summary."""
  from vlm_jax.convert import hf, workdir  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = workdir.load(src)
  name = hf.export_hf(config, params, tokenizer, dst, family)
  return f'{src} -> {dst}: {hf.FAMILIES[name].ARCHITECTURE}, {hf.count_params(params):,} parameters'


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  _check_args()
  from vlm_jax.convert import ConversionError, WorkdirError  # pylint: disable=g-import-not-at-top
  try:
    if _FROM.value:
      summary = import_folder(_SRC.value, _DST.value, _OVERWRITE.value)
    else:
      summary = export_workdir(_SRC.value, _DST.value, _FAMILY.value)
  except (ConversionError, WorkdirError, OSError, ValueError) as e:
    raise cli.UserError(str(e).replace('\n', ' ')) from None
  print(summary)


if __name__ == '__main__':
  cli.run(main)
