"""ALBEF on `shapes` (Li et al., 2021): cross-attention fusion, the text encoder's upper
layers attending to image tokens, trained with itc + itm (hard negatives) + mlm.

  python -m vlm_jax.train --config=configs/albef_shapes.py --workdir=runs/albef_shapes

Variants: '' (2 fusion layers on the 2-layer width-128 towers of clip_shapes), 'tiny'.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.fusion.name = 'cross_attention'
  return c
