"""CLIP (softmax contrastive) dual encoder on your own images and captions: a folder with
captions.csv / captions.jsonl, or WebDataset tar shards (README, "Your own data").

  python -m vlm_jax.train --config=configs/clip_folder.py --workdir=runs/my_data \
      --config.data.path=DIR [--config.eval.prompt_templates="('a photo of a {}.',)"]

Zero-shot top-1 on `test` uses the label names as classes (when the data has labels), with
prompt templates from the train captions that name a label unless given (written to the
workdir's prompt_templates.json); retrieval recalls always. Variants: '' (clip_shapes'
CPU-sized towers, 64 px, patch 8), 'tiny' (tests, seconds), 'b16' (CLIP ViT-B/16 at 224 px,
for accelerators).

Result on 2 CPU cores shared with other jobs, on 1,797 real handwritten-digit scans
(scikit-learn's `load_digits`, written as a folder by experiments/make_digits_folder.py;
1,437 train / 180 test images), seed 0, 5 min 57 s of wall time including the 2 s build:

  python -m vlm_jax.train --config=configs/clip_folder.py --workdir=runs/clip_digits \
      --config.data.path=data/digits --config.data.image_size=32 \
      --config.train.num_steps=600 \
      --config.eval.prompt_templates="('a scan of the handwritten digit {}',)"

eval/test/zeroshot_top1 0.978 (10-way), eval/test/i2t_recall@10 0.539 and t2i_recall@10
0.556, at their ceiling of about 10/18 (each caption fits the ~18 test scans of its digit).
"""
from vlm_jax import config_utils


def _folder_data(c):
  c.data.name = 'image_text_folder'
  c.model.text.vocab_size = 0  # the tokenizer trained on the data's captions
  c.data.train_split = 'train'
  c.eval.splits = ('test',)
  c.eval.matching = False  # swap negatives exist only for shapes' scenes
  c.eval.prompt_templates = ()  # from the train captions that name a label (eval/runner.py)
  return c


def get_config(arg: str | None = None):
  variants = {'': ('clip_shapes', None), 'tiny': ('clip_shapes', 'tiny'),
              'b16': ('clip_vit_b16', None)}
  if (arg or '') not in variants:
    raise ValueError(f'Unknown variant {arg!r} of clip_folder; accepted: {sorted(variants)}.')
  name, variant = variants[arg or '']
  c = _folder_data(config_utils.sibling_config(__file__, name, variant))
  if not arg:
    c.data.image_size = 64
    c.train.num_steps, c.optim.warmup_steps = 2000, 100
  if arg == 'tiny':
    c.eval.max_examples = 0
  if arg == 'b16':
    c.data.encoding = 'jpeg'  # 224 px photos: PNG would be several times larger
  return c
