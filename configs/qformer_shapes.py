"""BLIP-2's Q-Former on `shapes` (Li et al., 2023): learned queries that cross-attend to the
image tokens every other layer and share self-attention with the text; itc + itm (hard
negatives) + mlm.

  python -m vlm_jax.train --config=configs/qformer_shapes.py --workdir=runs/qformer_shapes

Variants: '' (16 queries, 1000 steps) and 'tiny'.
Result on 2 CPU cores (default variant, seed 0, data already built): 12 min 11 s wall;
eval/test/relation_accuracy 0.480 (ITM; chance 0.5), attribute_accuracy 0.618, itm_accuracy
0.850, zeroshot_top1 0.614 (test) and 0.285 (test_novel), i2t_recall@1 0.128.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.fusion.name = 'qformer'
  c.model.fusion.every = 2
  if arg != 'tiny':
    c.model.fusion.num_queries = 16
    # ~0.33 s per step at batch 64 on 2 CPU cores (1.4x ALBEF): 1000 steps fit 15 minutes.
    c.train.num_steps = 1000
  return c
