"""SigLIP (sigmoid contrastive) dual encoder on `shapes`: the CLIP config with SigLIP's loss,
temperature init log 10 and learnable bias init -10 (Zhai et al., 2023).

  python -m vlm_jax.train --config=configs/siglip_shapes.py --workdir=runs/siglip_shapes

Variants as in configs/clip_shapes.py ('', 'tiny', 'bench').
Result on 2 CPU cores (default variant, seed 0): eval/test_novel/zeroshot_top1 0.663,
eval/test/zeroshot_top1 0.991, eval/test/i2t_recall@1 0.206.
"""
import math

from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'clip_shapes', arg)
  c.loss.name = 'sigmoid'
  c.model.temperature.init = math.log(10.0)
  c.model.temperature.max = math.log(1e4)  # released SigLIP scales sit above CLIP's ln 100
  c.model.temperature.bias_init = -10.0
  c.model.temperature.learn_bias = True
  return c
