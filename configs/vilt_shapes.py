"""ViLT-style single-stream fusion on `shapes` (Kim et al., 2021): image and text tokens,
with modality embeddings, in one transformer; itc + itm (hard negatives) + mlm.

  python -m vlm_jax.train --config=configs/vilt_shapes.py --workdir=runs/vilt_shapes

Variants: '' (1000 steps) and 'tiny'. Unlike ViLT, the tokens come from the (shallow) towers of the dual
encoder, whose contrastive similarities also pick the ITM hard negatives.
Result: not yet measured with the grounding recipe of fusion_shapes.py (configs/albef_shapes.py
and configs/flamingo_shapes.py carry theirs).
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  if arg != 'tiny':
    # ~0.33 s per step at batch 64 on 2 CPU cores (1.4x ALBEF): 1000 steps fit 15 minutes.
    c.train.num_steps = 1000
  c.model.fusion.name = 'merged'
  return c
