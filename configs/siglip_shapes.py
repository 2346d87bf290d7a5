"""SigLIP (sigmoid contrastive) dual encoder on `shapes`: the CLIP config with SigLIP's loss,
temperature init log 10 and learnable bias init -10 (Zhai et al., 2023), and every pair of
identical captions in a batch labelled positive (`loss.positives='same_text'`): `shapes`
repeats captions within a batch, and plain SigLIP treats those repeats as negatives.

  python -m vlm_jax.train --config=configs/siglip_shapes.py --workdir=runs/siglip_shapes

Variants as in configs/clip_shapes.py ('', 'tiny', 'bench').
Results on 2 CPU cores (seed 0), eval/test_novel/zeroshot_top1:
  default (4000 steps): 0.701 (test 0.989, test i2t_recall@1 0.202, t2i_recall@1 0.184);
  loss.positives='pair' (plain SigLIP): 0.663;
  temperature and bias at 10x the learning rate: 0.671;
  --config.train.num_steps=8000: 0.798 / 0.820 / 0.826 at steps 4000 / 6000 / 8000;
  --config.optim.learning_rate=2e-3: 0.679;
  batch 64 for 8000 steps: 0.390 at step 4000 (ResNet tower: 0.550), stopped there;
  loss.positives='same_label' (data.labels=True; one-object images of a class are
  positives, as UniCL): 0.541;
  the ResNet image tower of configs/clip_resnet_shapes.py: 0.750 (CLIP with it: 0.964).
  The misses are shape confusions within a colour (an unseen 'orange circle' read as the
  seen 'orange square'): the sigmoid loss generalises to unseen colour-shape pairs less
  well than the softmax loss on the same towers.
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
  c.loss.positives = 'same_text'
  return c
