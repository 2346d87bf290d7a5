"""Flamingo-style gated cross-attention on `shapes` (Alayrac et al., 2022): causal language
model blocks on the causal text tower's tokens, with a tanh-gated cross-attention and
feed-forward (gates initialised at 0) before every block; itc + itm (hard negatives),
pooled at the EOT token. No MLM: a causal model sees no right context.

  python -m vlm_jax.train --config=configs/flamingo_shapes.py --workdir=runs/flamingo_shapes

Variants: '' (1500 steps, about ALBEF's step time) and 'tiny'.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.text.causal, c.model.text.pool = True, 'eot'
  f = c.model.fusion
  f.name, f.causal, f.every, f.pool = 'gated_xattn', True, 1, 'eot'
  c.model.heads.mlm = False
  c.loss.weights.mlm = 0.0
  return c
