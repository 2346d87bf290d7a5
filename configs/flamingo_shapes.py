"""Flamingo-style gated cross-attention on `shapes` (Alayrac et al., 2022): causal language
model blocks on the causal text tower's tokens, with a tanh-gated cross-attention and
feed-forward (gates initialised at 0) before every block; itc + itm (hard negatives),
pooled at the EOT token. No MLM: a causal model sees no right context.

  python -m vlm_jax.train --config=configs/flamingo_shapes.py --workdir=runs/flamingo_shapes

Variants: '' (1500 steps, about ALBEF's step time) and 'tiny'.
Result on 2 CPU cores (default variant, seed 0, data already built): 13 min 5 s wall;
eval/test/relation_accuracy 0.510 (ITM; chance 0.5), attribute_accuracy 0.980 (0.519 on
test_novel: colours swapped between seen objects mostly make pairs never seen in training,
which ITM can reject without binding), itm_accuracy 0.978, zeroshot_top1 0.939 (test) and
0.327 (test_novel), i2t_recall@1 0.195.
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
