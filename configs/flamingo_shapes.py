"""Flamingo-style gated cross-attention on `shapes` (Alayrac et al., 2022): causal language
model blocks on the causal text tower's tokens, with a tanh-gated cross-attention and
feed-forward (gates initialised at 0) before every block;
itc + itm (hard negatives) + next-token prediction on the fused stream (its grounding
objective: a causal model sees no right context for MLM), pooled at the EOT token.

  python -m vlm_jax.train --config=configs/flamingo_shapes.py --workdir=runs/flamingo_shapes

Variants: '' (1200 steps at batch 64, the grounding recipe of fusion_shapes.py) and 'tiny'.
Result on 2 cores of an AMD EPYC (default variant, seed 0, data already built; from
experiments/results/recipes/flamingo_shapes.json): 12 min 3 s wall; on test, ITM position
accuracy 1.000 on one-object scenes and 0.509 on two-object ones, relation_accuracy 0.516,
attribute_accuracy 0.649 (0.467 on test_novel), itm_accuracy 0.854, zeroshot_top1 0.452 (test)
and 0.315 (test_novel).
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'fusion_shapes', arg)
  c.model.text.causal, c.model.text.pool = True, 'eot'
  f = c.model.fusion
  f.name, f.causal, f.every, f.pool = 'gated_xattn', True, 1, 'eot'
  # No MLM (a causal model sees no right context): the grounding objective is next-token
  # prediction on the fused stream, read by the vocabulary head.
  c.loss.weights.mlm, c.loss.weights.caption = 0.0, 1.0
  return c
