"""Hugging Face checkpoints: import, export, and pretrained workdirs.

  model, params, tokenizer = vlm_jax.convert.load_hf('path/to/clip-vit-base-patch16')
  emb = model.apply({'params': params}, images, method=model.encode_image)

Families (by config.json's model_type): clip, siglip, vit, bert, and the BLIP-2 Q-Former
(blip_2_qformer, and import from full blip-2 checkpoints); `register_family` adds more.
The command line is `python -m vlm_jax.convert --help`.
"""
from vlm_jax.convert import blip2, blip2_qformer
from vlm_jax.convert.hf import (EXPORTS, FAMILIES, export_hf, import_hf, load_hf,
                                register_family)
from vlm_jax.convert.hf_config import UnsupportedFamilyError, UnsupportedOptionError
from vlm_jax.convert.rules import ConversionError
from vlm_jax.convert.workdir import WorkdirError

register_family(blip2.NAME, blip2)
register_family(blip2_qformer.NAME, blip2_qformer, exports_model='qformer')

__all__ = ['EXPORTS', 'FAMILIES', 'ConversionError', 'UnsupportedFamilyError',
           'UnsupportedOptionError', 'WorkdirError', 'export_hf', 'import_hf', 'load_hf',
           'register_family']
