"""ViLT-style single-stream fusion on `shapes` (Kim et al., 2021): image and text tokens,
with modality embeddings, in one transformer; itc + itm (hard negatives) + mlm.

  python -m vlm_jax.train --config=configs/vilt_shapes.py --workdir=runs/vilt_shapes

Variants: '' (1000 steps) and 'tiny'. Unlike ViLT, the tokens come from the (shallow) towers of the dual
encoder, whose contrastive similarities also pick the ITM hard negatives.
Result on 2 CPU cores (default variant, seed 0, data already built): 11 min 49 s wall;
eval/test/relation_accuracy 0.492 (ITM; chance 0.5), attribute_accuracy 0.688, itm_accuracy
0.868, zeroshot_top1 0.619 (test) and 0.331 (test_novel), i2t_recall@1 0.117.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  if arg != 'tiny':
    # ~0.33 s per step at batch 64 on 2 CPU cores (1.4x ALBEF): 1000 steps fit 15 minutes.
    c.train.num_steps = 1000
  c.model.fusion.name = 'merged'
  return c
