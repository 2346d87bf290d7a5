"""The common base of the fusion configs on `shapes` (albef_, vilt_, flamingo_, qformer_shapes):
the CLIP towers of configs/clip_shapes.py with a bidirectional, CLS-pooled text tower, a
fusion layer on their tokens, and ALBEF's objectives: contrastive (itc) + image-text
matching with hard negatives (itm: negatives drawn from the batch's similarities, mildly
sharpened, plus the dataset's relation- and attribute-swapped captions) + masked language modelling (mlm).

Not a config to run on its own: it has no fusion layer name. Variants: '' and 'tiny'.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'clip_shapes', arg)
  c.model.name = 'fusion_encoder'
  c.model.text.causal, c.model.text.pool = False, 'cls'
  f = c.model.fusion
  f.width, f.pool = 0, 'first'  # the text width; ITM reads the BOS/CLS position
  if arg == 'tiny':
    f.depth, f.num_heads, f.mlp_dim, f.num_queries = 1, 2, 64, 4
  else:
    f.depth, f.num_heads, f.mlp_dim = 2, 4, 512
    c.train.num_steps = 1500
    c.checkpoint.every_steps = 500
  c.model.heads.itm = c.model.heads.mlm = True
  c.data.hard_negatives = True
  c.loss.weights = dict(itc=1.0, itm=1.0, mlm=1.0)
  # ALBEF draws ITM negatives at the contrastive logit scale; on `shapes` the batch's most
  # similar captions are mostly true ones (same shapes, other template), and ITM then never
  # leaves its prior (measured: ITM accuracy stuck at 71% for 300 steps, 91% at scale 1).
  c.loss.itm_negative_scale = 1.0
  return c
