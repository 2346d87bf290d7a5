"""BLIP-2's Q-Former on `shapes` (Li et al., 2023): learned queries that cross-attend to the
image tokens every other layer and share self-attention with the text; itc + itm (hard
negatives) + mlm.

  python -m vlm_jax.train --config=configs/qformer_shapes.py --workdir=runs/qformer_shapes

Variants: '' (16 queries, 1000 steps) and 'tiny'.
Result: not yet measured with the grounding recipe of fusion_shapes.py (configs/albef_shapes.py
and configs/flamingo_shapes.py carry theirs).
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
