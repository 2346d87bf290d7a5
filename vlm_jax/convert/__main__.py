"""Converts Hugging Face checkpoints to pretrained workdirs and back.

  python -m vlm_jax.convert --from=hf --src=HF_DIR --dst=WORKDIR
  python -m vlm_jax.train --config=... --workdir=RUN --config.init.pretrained=WORKDIR
  python -m vlm_jax.convert --to=hf --src=WORKDIR --dst=HF_DIR

WORKDIR holds config.json, params/ (orbax) and the tokenizer; `--to=hf` also takes a training
workdir (its latest checkpoint). A LoRA run exports with its factors merged into the kernels,
or, with --nomerge_lora, its base weights with the factors beside them in lora.safetensors.
Families: CLIP, SigLIP, ViT, BERT, the BLIP-2 Q-Former (see vlm_jax/convert).
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
_MERGE_LORA = flags.DEFINE_bool('merge_lora', True, 'With --to=hf, for a LoRA run '
                                 '(model.lora.rank > 0): merge the factors into the exported '
                                 'weights; --nomerge_lora exports the base weights and writes the '
                                 'factors to lora.safetensors (our parameter paths, rank and '
                                 'alpha in its metadata).')
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


def export_workdir(src: str, dst: str, family: str = '', merge_lora: bool = True) -> str:
  """Workdir -> Hugging Face folder; returns a one-line summary. A LoRA run's factors are
  merged, or with `merge_lora=False` written to lora.safetensors beside the base weights."""
  from vlm_jax.convert import hf, workdir  # pylint: disable=g-import-not-at-top
  from vlm_jax.models import lora  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = workdir.load(src, merge_lora)
  factors = None
  if lora.PARAMS_KEY in params:  # only without merging
    (params, factors), lora_cfg = lora.split(params), config.model.lora
    config = workdir.merged_config(config)
  name = hf.export_hf(config, params, tokenizer, dst, family)
  extra = ''
  if factors is not None:
    extra = f', LoRA factors in {hf.export_lora(dst, factors, lora_cfg)}'
  return (f'{src} -> {dst}: {hf.FAMILIES[name].ARCHITECTURE}, {hf.count_params(params):,} '
          f'parameters{extra}')


def main(argv: list[str]) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  _check_args()
  from vlm_jax.convert import ConversionError, WorkdirError  # pylint: disable=g-import-not-at-top
  try:
    if _FROM.value:
      summary = import_folder(_SRC.value, _DST.value, _OVERWRITE.value)
    else:
      summary = export_workdir(_SRC.value, _DST.value, _FAMILY.value, _MERGE_LORA.value)
  except (ConversionError, WorkdirError, OSError, ValueError) as e:
    raise cli.UserError(str(e).replace('\n', ' ')) from None
  print(summary)


if __name__ == '__main__':
  cli.run(main)
