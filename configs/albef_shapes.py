"""ALBEF on `shapes` (Li et al., 2021): cross-attention fusion, the text encoder's upper
layers attending to image tokens, trained with itc + itm (hard negatives) + mlm.

  python -m vlm_jax.train --config=configs/albef_shapes.py --workdir=runs/albef_shapes

Variants: '' (2 fusion layers on the 2-layer width-128 towers of clip_shapes, 1500 steps at
batch 128), 'tiny'.
Result on 2 CPU cores (default variant, seed 0, data already built): 12 min 45 s wall;
eval/test/relation_accuracy 0.492 (ITM; chance 0.5), attribute_accuracy 0.555, itm_accuracy
0.838, zeroshot_top1 0.791 (test) and 0.430 (test_novel), i2t_recall@1 0.167.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.fusion.name = 'cross_attention'
  return c
