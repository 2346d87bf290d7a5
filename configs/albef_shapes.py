"""ALBEF on `shapes` (Li et al., 2021): cross-attention fusion, the text encoder's upper
layers attending to image tokens, trained with itc + itm (hard negatives) + mlm.

  python -m vlm_jax.train --config=configs/albef_shapes.py --workdir=runs/albef_shapes

Variants: '' (2 fusion layers on the 2-layer width-128 towers of clip_shapes, 1200 steps at
batch 64, the grounding recipe of fusion_shapes.py), 'tiny'.
Result on 2 cores of an AMD EPYC (default variant, seed 0, data already built; from
experiments/results/recipes/albef_shapes.json): 11 min 25 s wall; on test, ITM position
accuracy 1.000 on one-object scenes and 0.496 on two-object ones, relation_accuracy 0.506,
attribute_accuracy 0.527 (chance 0.5 each: two objects are not bound yet), itm_accuracy 0.827,
zeroshot_top1 0.425 (test) and 0.291 (test_novel).
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.fusion.name = 'cross_attention'
  return c
