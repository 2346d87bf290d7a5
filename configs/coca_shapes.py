"""CoCa on `shapes` (Yu et al., 2022): a contrastive captioner that also answers questions.

  python -m vlm_jax.train --config=configs/coca_shapes.py --workdir=runs/coca_shapes
  python -m vlm_jax.generate --workdir=runs/coca_shapes --image=scene.png [--question=...]

The ViT of clip_shapes; 1 + 16 attention-pooled image queries (the first for the contrastive
embedding, the others for the decoder); 2 unimodal causal text layers (contrastive text
embedding from a [CLS] appended to the text) and 2 multimodal layers with cross-attention to
the pooled queries. Objective: itc 1 + caption 2 (CoCa's weights) + vqa 1 (one question per
image, `[BOS] question answer [EOS]`, loss on the answer), label smoothing 0.1.

Variants: '' (default: 2000 steps at batch 128, 1.47 M parameters), 'tiny' (tests: 1 + 1
layers, width 32, 4 queries).
Result on 2 CPU cores (default variant, seed 0, data already built), on `test`:
caption_object_accuracy 0.976, vqa_accuracy 0.912 (0.995 on single-object images), cider
4.379, bleu4 0.733, zeroshot_top1 0.974 (0.747 on test_novel), i2t_recall@1 0.265; in 16 min
25 s of wall time with other jobs on the cores (load 4-6; about 490 ms per step, 1 min of
evaluation); the train step takes 272 ms on the idle machine (experiments/benchmarks/run.py),
about 10 min for the whole run. Two runs gave bit-identical results.
"""
from vlm_jax.config_utils import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, 'clip_shapes', arg)
  c.model.name = 'coca'
  d = c.model.decoder
  if arg == 'tiny':
    d.unimodal_depth, d.multimodal_depth, d.num_queries = 1, 1, 4
  else:
    d.unimodal_depth, d.multimodal_depth, d.num_queries = 2, 2, 16
    c.train.num_steps = 2000
    c.checkpoint.every_steps = 500
  c.data.vqa = True
  c.loss.weights = dict(itc=1.0, itm=0.0, mlm=0.0, caption=2.0, vqa=1.0)
  c.loss.label_smoothing = 0.1
  c.eval.matching = False  # relation/attribute swaps: see the fusion configs
  return c
