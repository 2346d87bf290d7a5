"""The common base of the fusion configs on `shapes` (albef_, vilt_, flamingo_, qformer_shapes):
the CLIP towers of configs/clip_shapes.py with a bidirectional, CLS-pooled text tower, a
fusion layer on their tokens, and ALBEF's objectives: contrastive (itc) + image-text
matching with hard negatives (itm: negatives drawn from the batch's similarities, mildly
sharpened, plus the dataset's relation-, attribute- and position-swapped captions) + masked
language modelling (mlm) that masks place, colour and shape words more often, after a
curriculum of one-object scenes whose captions name a place (README, "Grounding objectives").

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
    c.train.num_steps, c.train.batch_size = 1200, 64
    c.checkpoint.every_steps = 400
  c.model.heads.itm = c.model.heads.mlm = True
  c.data.hard_negatives = True
  c.loss.weights = dict(itc=1.0, itm=1.0, mlm=1.0, caption=0.0)
  # ALBEF draws ITM negatives at the contrastive logit scale; on `shapes` the batch's most
  # similar captions are mostly true ones (same shapes, other template), and ITM then never
  # leaves its prior (measured: ITM accuracy stuck at 71% for 300 steps, 91% at scale 1).
  c.loss.itm_negative_scale = 1.0
  # Grounding before binding: ITM alone never leaves ln 2 here, and masked words on the
  # whole stream do not ground either (relation words in two-object captions need the
  # binding they are meant to teach). The first steps show one-object scenes with captions
  # that name a place; MLM masks the place, colour and shape words more often than others.
  c.data.hard_negative_kinds = ('relation', 'attribute', 'position')
  c.data.curriculum.steps = 30 if arg == 'tiny' else 300
  c.data.curriculum.words = ('left', 'right', 'top', 'bottom', 'above', 'below')
  classes = c.loss.mlm_word_classes
  classes.spatial.probability = 0.8
  classes.attribute.probability = 0.5
  classes.object.probability = 0.3
  return c
