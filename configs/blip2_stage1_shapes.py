"""BLIP-2 stage 1 on `shapes` (Li et al., 2023): a Q-Former learns to read a frozen CLIP image
tower with image-text contrastive learning (ITC), image-text matching (ITM) and
image-grounded text generation (ITG), each under its own self-attention mask.

  python -m vlm_jax.train --config=configs/clip_shapes.py --workdir=runs/clip_shapes
  python -m vlm_jax.train --config=configs/blip2_stage1_shapes.py \
      --workdir=runs/blip2_stage1_shapes [--config.init.pretrained=runs/clip_shapes]

The image tower (and its config, preprocessing) comes from the CLIP run in `init.pretrained`
and stays frozen (`optim.frozen`; the model also stops its gradient). The Q-Former
(vlm_jax/models/blip2_qformer.py) has 8 learned queries of width 128, 2 BERT-style layers,
cross-attention to the image every other layer (BLIP-2's layout), and its own word and
position embeddings. ITC: the max over the queries' cosine similarities, temperature 0.07 at
init and unclamped, label smoothing 0.1; ITM: in-batch hard negatives (mildly sharpened, as
in the fusion configs) and the dataset's swapped captions; ITG: next-token loss, smoothing 0.1.

Variants: '' (default) and 'tiny' (tests: a 2-layer, width-32 Q-Former, 4 queries, from
scratch unless init.pretrained is given).
Result on 2 CPU cores shared with other jobs (default variant, seed 0, from the 4000-step
clip_shapes run): final in-batch ITC accuracy 0.73, ITM accuracy 0.85, ITG token accuracy
0.82; 795,069 of 1,219,005 parameters trained; 9 min 43 s of wall time. No evaluator of its
own (its results.json is empty): configs/blip2_shapes.py measures it.
"""
import math

from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'clip_shapes', arg)
  c.model.name = 'blip2_qformer'
  f = c.model.fusion
  f.name, f.every, f.ln_eps = 'qformer', 2, 1e-12
  if arg == 'tiny':
    # Two layers: the text reads the image only through queries that have cross-attended
    # in an earlier layer.
    f.width, f.depth, f.num_heads, f.mlp_dim, f.num_queries = 32, 2, 2, 64, 4
  else:
    f.width, f.depth, f.num_heads, f.mlp_dim, f.num_queries = 128, 2, 4, 512, 8
    c.init.pretrained = 'runs/clip_shapes'
    # ITM triples the batch through the Q-Former: ~1 s per step at batch 64 on 2 busy cores.
    c.train.batch_size, c.train.num_steps = 64, 600
    c.checkpoint.every_steps = 300
  c.init.include = ('image_encoder/',)
  c.optim.frozen = ('image_encoder/',)
  # BLIP-2 stage 1: temperature 0.07 at init, not clamped (shared/NOTES.md).
  c.model.temperature.update(init=math.log(1 / 0.07), min=-math.inf, max=math.inf)
  c.loss.weights = dict(itc=1.0, itm=1.0, mlm=0.0, caption=1.0)
  c.loss.label_smoothing = 0.1
  c.loss.itm_negative_scale = 1.0  # see configs/fusion_shapes.py
  c.data.hard_negatives = True
  c.eval.zeroshot = c.eval.retrieval = c.eval.matching = False
  c.eval.splits = ('test',)
  return c
