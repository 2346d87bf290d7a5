"""CLIP ViT-B/16 (Radford et al., 2021), the paper architecture, for accelerators:
149.6 M parameters, 224 px, patch 16, text context 77, QuickGELU, embedding 512.

  python -m vlm_jax.train --config=configs/clip_vit_b16.py --workdir=runs/clip_b16 \
      --config.data.builder_config=224px

Variants: '' (paper size), 'tiny' (same switches, test size).
"""
from vlm_jax.defaults import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.data.builder_config, c.data.image_size, c.data.max_text_len = '224px', 224, 77
  c.data.mean = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing
  c.data.std = (0.26862954, 0.26130258, 0.27577711)
  c.model.embed_dim = 512
  c.model.image.update(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                            pool='cls', posemb='learn', ln_pre=True, quick_gelu=True))
  c.model.text.update(dict(vocab_size=49408, width=512, depth=12, num_heads=8, mlp_dim=2048,
                           causal=True, pool='eot', quick_gelu=True))
  c.train.num_steps, c.train.batch_size = 10000, 1024
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay = 5e-4, 2000, 0.2
  c.optim.b2 = 0.98
  c.checkpoint.every_steps = 1000
  c.model.dtype = 'bfloat16'
  if arg == 'tiny':
    c.data.builder_config, c.data.image_size, c.data.max_text_len = '32px_small', 32, 16
    c.model.embed_dim = 32
    c.model.image.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
    c.model.text.update(dict(vocab_size=0, width=32, depth=1, num_heads=2, mlp_dim=64))
    c.train.num_steps, c.train.batch_size = 4, 16
    c.optim.warmup_steps = 2
    c.model.dtype = 'float32'
  elif arg:
    raise ValueError(f'Unknown variant {arg!r} of clip_vit_b16; accepted: tiny.')
  c.lock()
  return c
