"""A small causal language model on the text of `shapes`: the frozen LM of BLIP-2 stage 2.

  python -m vlm_jax.train --config=configs/lm_shapes.py --workdir=runs/lm_shapes

A decoder-only transformer (`model.name='causal_lm'`, vlm_jax/models/causal_lm.py) of the
text tower's size in clip_shapes (2 layers, width 128), trained on the captions and on
`[BOS] question answer [EOS]` sequences (loss on the answer) without ever seeing an image.
Its evaluation captions and answers every test image blind: the language prior that
BLIP-2's image prefix has to move (configs/blip2_shapes.py).

Variants: '' (default) and 'tiny' (tests).
Result on 2 CPU cores shared with other jobs (default variant, seed 0), on `test`, blind:
caption_object_accuracy 0.036 (chance 1/40), vqa_accuracy 0.381, cider 0.364, bleu4 0.057;
413,754 parameters; 7 min 37 s of wall time.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'clip_shapes', arg)
  c.model.name = 'causal_lm'
  if arg != 'tiny':
    c.train.num_steps = 1000
    c.checkpoint.every_steps = 500
  c.data.vqa = True
  c.loss.weights = dict(itc=0.0, itm=0.0, mlm=0.0, caption=1.0, vqa=1.0)
  c.eval.zeroshot = c.eval.retrieval = c.eval.matching = False
  c.eval.splits = ('test',)
  return c
