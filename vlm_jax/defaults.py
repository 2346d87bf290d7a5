"""The complete, locked config schema that every `configs/*.py` starts from.

Every key a component reads lives here with its default, so that an unknown key given on
the command line is an error (see `vlm_jax.config_utils`).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      name='shapes',
      builder_config='32px',    # shapes: '32px' | '64px' | '224px' (+ '_small' for tests)
      data_dir='',              # '' = tensorflow-datasets' usual directory
      tokenizer='',             # path to a tokenizer.json; '' = the dataset's own
      image_size=32,
      max_text_len=16,
      train_split='train',
      mean=(0.5, 0.5, 0.5),     # per-channel normalisation of [0, 1] pixels
      std=(0.5, 0.5, 0.5),
      flip=False,               # horizontal flip, with left/right swapped in captions
      num_threads=2,
      prefetch=4,
  )

  c.model = dict(
      name='dual_encoder',
      embed_dim=128,
      dtype='float32',          # compute dtype; parameters are always param_dtype
      param_dtype='float32',
      image=dict(
          name='vit', patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=512,
          pool='cls', posemb='learn', ln_pre=True, quick_gelu=False, proj_bias=False,
          patch_bias=False,     # bias on the patch embedding (CLIP has none)
          ln_eps=1e-5, dropout=0.0),
      text=dict(
          name='transformer', vocab_size=0,   # 0 = taken from the tokenizer
          width=128, depth=2, num_heads=4, mlp_dim=512, causal=True, pool='eot',
          quick_gelu=False, proj_bias=False, ln_eps=1e-5, dropout=0.0),
      fusion=dict(name=''),
      heads=dict(),
      temperature=dict(init=2.6592600369644165,  # ln(1 / 0.07)
                       min=0.0, max=4.605170185988092,  # ln(100)
                       bias_init=0.0, learn_bias=False),
      remat='none',             # 'none' | 'full' | 'dots_saveable'
      scan_layers=False,
  )

  # sharded: with a mesh, the loss runs in shard_map over the batch mesh axes (softmax:
  # local rows against gathered columns; sigmoid: SigLIP's chunked ppermute ring).
  # block_size: the sigmoid ring scores each [b, b] chunk (b = per-device batch) in column
  # blocks of the largest divisor of b that is <= block_size, so its per-device memory is
  # O(b * block_size + B * E), linear in the global batch B (also used under pmap).
  c.loss = dict(name='softmax', weights=dict(), sharded=False, block_size=256)

  c.optim = dict(
      name='adamw', learning_rate=1e-3, warmup_steps=100, schedule='cosine',
      end_learning_rate_factor=0.0, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
      grad_clip_norm=1.0)

  # mode 'jit': one global program partitioned by XLA over the ('data', 'fsdp', 'tensor')
  # mesh; parameters and optimizer state are sharded by `rules` (logical axis name -> mesh
  # axes, first match wins), the batch over the axes of the 'batch' rule. mode 'pmap': data
  # parallelism by `jax.pmap` over the mesh's devices (fsdp = tensor = 1), replicated state.
  # See vlm_jax/training/partitioning.py and pmap_driver.py.
  c.parallel = dict(
      mode='jit',               # 'jit' | 'pmap'
      mesh=dict(data=-1, fsdp=1, tensor=1),  # sizes; one may be -1 (the remaining devices)
      # 'fsdp' before 'data': the other order gives silently wrong gradients in jax 0.10.2
      # when both axes and 'tensor' are > 1 (shared/NOTES.md); partitioning refuses it.
      rules=(('batch', ('fsdp', 'data')),
             ('embed', 'fsdp'),     # FSDP: every parameter with a model-width dimension
             ('mlp', 'tensor'),     # tensor parallelism: MLP hidden units ...
             ('heads', 'tensor'),   # ... attention heads ...
             ('vocab', 'tensor'),   # ... and the token embedding's vocabulary
             ('kv', None),
             ('joint', None),
             ('patch', None),
             ('layers', None)),
  )

  c.train = dict(
      num_steps=1000,
      batch_size=128,           # the global batch, over all processes and devices
      log_every_steps=50,
      max_steps_per_run=0,      # > 0: checkpoint and exit after this many steps
      # > 1: gradient caching over this many micro-batches (same loss and gradients as one
      # batch, all negatives kept; less activation memory, one extra forward pass). The
      # per-device batch must be divisible by it. See vlm_jax/training/accumulation.py.
      microbatches=1,
  )

  c.eval = dict(
      every_steps=0,            # 0 = only at the end
      splits=('test', 'test_novel'),
      batch_size=256,
      zeroshot=True,
      retrieval=True,
      max_examples=0,           # 0 = the whole split
      prompt_templates=('a {}', 'a small {}', 'a large {}', 'a picture of a {}'),
  )

  c.checkpoint = dict(every_steps=500, keep=3, async_save=True)
  return c
