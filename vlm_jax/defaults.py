"""The complete, locked config schema that every `configs/*.py` starts from.

Every key a component reads lives here with its default, so that an unknown key given on
the command line is an error (see `vlm_jax.config_utils`).
"""
import ml_collections

# English defaults of the MLM word classes (loss.mlm_word_classes): where things are, what
# they look like, what they are.
SPATIAL_WORDS = ('left', 'right', 'top', 'bottom', 'above', 'below', 'under', 'over',
                 'middle', 'center', 'centre', 'behind', 'front', 'beside', 'near', 'next',
                 'inside', 'outside', 'between', 'upper', 'lower')
ATTRIBUTE_WORDS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'black',
                   'cyan', 'pink', 'brown', 'gray', 'grey', 'small', 'large', 'big', 'tiny',
                   'little', 'tall', 'short', 'long', 'round', 'striped', 'wooden', 'metal')
OBJECT_WORDS = ('circle', 'square', 'triangle', 'cross', 'diamond', 'star', 'rectangle',
                'person', 'man', 'woman', 'child', 'dog', 'cat', 'horse', 'bird', 'car',
                'bus', 'train', 'bicycle', 'table', 'chair', 'cup', 'ball', 'tree', 'house')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      name='shapes',            # 'shapes' | 'image_text_folder' (your own data, data.path)
      builder_config='32px',    # shapes: '32px' | '64px' | '224px' (+ '_small' for tests)
      data_dir='',              # '' = tensorflow-datasets' usual directory
      tokenizer='',             # path to a tokenizer.json; '' = the dataset's own
      image_size=32,
      max_text_len=16,
      train_split='train',
      mean=(0.5, 0.5, 0.5),     # per-channel normalisation of [0, 1] pixels
      std=(0.5, 0.5, 0.5),
      flip=False,               # horizontal flip, with left/right swapped in captions
      hard_negatives=False,     # add a false caption per two-object image (for ITM)
      hard_negative_kinds=('relation', 'attribute'),  # its kinds: objects or colours swapped
                                # ('position': left/right, top/bottom, above/below mirrored)
      drop_color_prob=0.0,      # shapes: share of train captions with their colour words
                                # removed ('a red circle' -> 'a circle', still true)
      # The first `steps` train steps draw only examples with at most `max_objects` objects
      # (datasets that record num_objects, e.g. shapes; others count as one) and, of each
      # example's captions, one that holds one of `words` when it has any: grounding on simple
      # scenes first (0 = off). After them, until step `first_caption_steps`, each example's
      # first caption (shapes: its canonical wording, 'a red circle to the left of a blue
      # square'): one wording before many (0 = off).
      curriculum=dict(steps=0, max_objects=1, words=(), first_caption_steps=0),
      labels=False,             # add `label` [B]: the class of one-object images, -1 for
                                # others (for loss.positives='same_label')
      vqa=False,                # add one question-answer sequence per image (captioners:
                                # vqa_ids, vqa_mask, vqa_loss_mask; see data/pipeline.py)
      num_threads=1,            # grain reader threads; they share the GIL: on 2 cores one
                                # reads 32 px `shapes` at 8,400 examples/s, two at 7,400
                                # (more pay when decoding dominates: large JPEGs)
      prefetch=4,
      # image_text_folder (vlm_jax/data/image_text_folder.py): `path` is a folder with
      # captions.csv or captions.jsonl (columns image, caption, optional label, split), or
      # WebDataset shards (a folder of *.tar, one .tar, or 'dir/{00000..00009}.tar'). Images
      # without a split value go to test and validation by these fractions (a seeded hash of
      # their path), the rest to train. resize: 'crop' (shorter side to image_size, centre
      # square) | 'squash' (both sides). encoding: how the build stores images, 'png' (exact)
      # | 'jpeg' (quality 95, smaller for photos).
      path='',
      val_fraction=0.1,
      test_fraction=0.1,
      split_seed=0,
      resize='crop',
      encoding='png',
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
          ln_eps=1e-5, dropout=0.0,
          gelu_tanh=False,      # tanh-approximated GELU (SigLIP); exclusive with quick_gelu
          posemb_grid=0,        # side of the stored position grid, resized to other image
                                # sizes; 0 = the grid of data.image_size (no resizing)
          proj=True,            # False: the pooled output is the embedding (SigLIP; the
                                # ResNet, whose attention pool outputs embed_dim as CLIP's)
          pooler=False,         # model 'image_encoder': dense + tanh on the pooled token (HF ViT)
          patch_dropout=0.0,    # ViT: fraction of patch tokens dropped per example in
                                # training (FLIP); the class token is kept
          # name='resnet' (vlm_jax/encoders/resnet.py): CLIP's modified ResNet; `width` is the
          # stem width, `num_heads` the attention pool's heads, its output is embed_dim.
          layers=(1, 1, 1),     # bottleneck blocks per stage; the map shrinks by
                                # 4 * 2^(stages - 1): 3 stages leave 2 x 2 of 32 px
          norm='group',         # only 'group': batch statistics would couple the examples
                                # of a contrastive batch (README, "ResNet tower")
          norm_groups=32),      # GroupNorm groups: gcd(norm_groups, channels) per layer
      text=dict(
          name='transformer', vocab_size=0,   # 0 = taken from the tokenizer
          width=128, depth=2, num_heads=4, mlp_dim=512, causal=True, pool='eot',
          quick_gelu=False, proj_bias=False, ln_eps=1e-5, dropout=0.0,
          gelu_tanh=False,
          max_len=0,            # learned positions; 0 = data.max_text_len
          post_ln=False,        # BERT layout: embedding LayerNorm, post-LN blocks, no final LN
          type_vocab_size=0,    # > 0: BERT's token-type embedding (type 0)
          mask_pad=True,        # False: attend to padding tokens (SigLIP, pool='last')
          proj=True),           # False: the pooled output is the embedding
      # A fusion layer (vlm_jax/fusion) on the towers' tokens; name '' = a plain dual encoder.
      fusion=dict(
          name='',              # 'cross_attention' | 'gated_xattn' | 'qformer' | 'merged'
          width=0,              # D of the fused stream; 0 = the text tower's width
          depth=2, num_heads=4, mlp_dim=512, dropout=0.0, ln_eps=1e-5,
          causal=False,         # causal self-attention in the fused text stream (Flamingo)
          every=1,              # gated_xattn: gated block before every k-th LM block;
                                # qformer: cross-attention every k-th layer (BLIP-2: 2)
          num_queries=32,       # qformer: learned query tokens
          pool='first',         # ITM pooling of fused text tokens: 'first' | 'eot' | 'mean'
      ),
      heads=dict(itm=True, mlm=True),   # heads of a fusion model (ignored without fusion)
      # CoCa (model.name='coca', vlm_jax/models/coca.py): causal text layers of the width,
      # heads, MLP, vocabulary, positions, dropout and ln_eps of `text` (text.depth, causal
      # and pool are not used): `unimodal_depth` without and `multimodal_depth` with
      # cross-attention to `num_queries` attention-pooled image tokens; tie_embeddings: the
      # LM head is the transposed token embedding.
      decoder=dict(unimodal_depth=2, multimodal_depth=2, num_queries=16, tie_embeddings=False),
      # BLIP-2 (vlm_jax/models/blip2*.py): 'blip2_qformer' (stage 1) is the image tower and the
      # Q-Former of `fusion` (name 'qformer', width > 0), its text side of `text`'s vocabulary;
      # 'blip2' (stage 2) adds a decoder-only LM of `text` (as model 'causal_lm': width,
      # depth, heads, MLP; decoder.tie_embeddings) that reads the Q-Former's query outputs
      # through `adapter` ('linear' | 'mlp') as a soft prefix.
      blip2=dict(adapter='linear'),
      temperature=dict(init=2.6592600369644165,  # ln(1 / 0.07)
                       min=0.0, max=4.605170185988092,  # ln(100)
                       bias_init=0.0, learn_bias=False),
      remat='none',             # 'none' | 'full' | 'dots_saveable'
      scan_layers=False,
      # LoRA (vlm_jax/models/lora.py): kernel W -> W + (alpha / rank) A B on every kernel whose
      # '/'-joined path a `targets` regex matches (re.match; Dense 'kernel' or attention
      # 'qkv_kernel', 'kv_kernel', 'query_kernel', 'out_kernel'). With rank > 0 only the
      # factors (params 'lora/...') and the parameters matched by `train_also` (regexes,
      # e.g. a connector or head) are trained; every other parameter is frozen (optim.frozen).
      # No LoRA dropout. Exports merge the factors (python -m vlm_jax.convert --to=hf).
      lora=dict(rank=0,         # 0 = off
                alpha=8.0,
                targets=('.*attn/(qkv|query|kv|out)_kernel',),
                train_also=()),
  )

  # sharded: with a mesh, the loss runs in shard_map over the batch mesh axes (softmax:
  # local rows against gathered columns; sigmoid: SigLIP's chunked ppermute ring).
  # block_size: the sigmoid ring scores each [b, b] chunk (b = per-device batch) in column
  # blocks of the largest divisor of b that is <= block_size, so its per-device memory is
  # O(b * block_size + B * E), linear in the global batch B (also used under pmap).
  # weights: of each objective of a fusion model (vlm_jax/training/objectives.py); itc is the
  # contrastive loss `name`, itm image-text matching with hard negatives, mlm masked language
  # modelling with visual context. A dual encoder trains on itc alone.
  # itm_negative_scale: ITM negatives are drawn with probability softmax(scale * cosine);
  # -1 = the model's contrastive logit scale (ALBEF). A small scale draws nearly uniform
  # negatives, which matters where the batch's most similar captions are often true ones.
  # itm_batch_negatives: False = ITM's negatives are only the dataset's false captions
  # (data.hard_negatives), not texts and images drawn from the batch.
  # mlm_mask_id: the [MASK] token id; -1 = the tokenizer's (filled in by the trainer).
  # positives: 'pair' (image i with caption i only), 'same_text' (sigmoid: every pair whose
  # captions are identical is a positive, so repeated captions are not false negatives) or
  # 'same_label' (sigmoid: also every pair of one-object images of the same class, as
  # UniCL's image-label-text contrast; needs data.labels=True).
  # weights.caption, weights.vqa: next-token cross-entropy of captions and of VQA answers
  # (captioners; CoCa weighs caption 2, itc 1), with `label_smoothing`.
  # mlm_word_classes: grounding words masked more often than mlm_probability: each class's
  # `words` (English defaults) are selected with `probability` (0 = no focus); the tokenizer
  # maps them to ids at start-up (`token_ids`, filled in by the trainer; words it splits or
  # does not know are left out, and logged).
  # weights.caption (fusion models with causal text and fusion, e.g. Flamingo): next-token
  # cross-entropy of the fused text stream, the causal grounding objective.
  c.loss = dict(name='softmax', weights=dict(itc=1.0, itm=1.0, mlm=1.0, caption=0.0, vqa=0.0),
                label_smoothing=0.0, sharded=False,
                block_size=256, itm_negative_scale=-1.0, itm_batch_negatives=True,
                mlm_probability=0.15,
                mlm_word_classes=dict(
                    spatial=dict(probability=0.0, words=SPATIAL_WORDS, token_ids=()),
                    attribute=dict(probability=0.0, words=ATTRIBUTE_WORDS, token_ids=()),
                    object=dict(probability=0.0, words=OBJECT_WORDS, token_ids=())),
                mlm_mask_id=-1, positives='pair')

  # frozen: regexes matched (re.match) against '/'-joined parameter paths; matching
  # parameters are never updated and carry no optimizer state ('image' locks image_encoder
  # and image_proj: LiT). lr_multipliers: ((regex, factor), ...), the first match scales that
  # parameter's update (learning rate and weight decay). See vlm_jax/training/optimizer.py.
  c.optim = dict(
      name='adamw', learning_rate=1e-3, warmup_steps=100, schedule='cosine',
      end_learning_rate_factor=0.0, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
      grad_clip_norm=1.0, frozen=(), lr_multipliers=())

  # mode 'jit': one global program partitioned by XLA over the ('data', 'fsdp', 'tensor')
  # mesh; parameters and optimizer state are sharded by `rules` (logical axis name -> mesh
  # axes, first match wins), the batch over the axes of the 'batch' rule. mode 'pmap': data
  # parallelism by `jax.pmap` over the mesh's devices (fsdp = tensor = 1), replicated state.
  # See vlm_jax/training/partitioning.py and pmap_driver.py.
  c.parallel = dict(
      mode='jit',               # 'jit' | 'pmap'
      # CPU backend: synchronous dispatch and host memory kept by malloc between steps, so
      # a step does not page-fault its temp buffer in again (vlm_jax/training/cpu_backend.py;
      # clip_shapes.py trains at 1,465 instead of 1,140 examples/s on 2 cores). Read by
      # vlm_jax.train and vlm_jax.evaluate at start-up.
      cpu_tuning=True,
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
      # A step whose loss or gradients are NaN or Inf is never applied (vlm_jax/training/
      # nonfinite.py). 'skip': count it (train/skipped_steps) and go on, but stop after
      # `max_consecutive_skips` in a row (0 = never); 'stop': stop, naming the first such step.
      nonfinite='skip',
      max_consecutive_skips=10,
  )

  c.eval = dict(
      every_steps=0,            # 0 = only at the end
      splits=('test', 'test_novel'),
      batch_size=256,
      zeroshot=True,
      retrieval=True,
      max_examples=0,           # 0 = the whole split
      # true caption vs relation- and attribute-swapped ones (every model); fusion models
      # add ITM accuracy and retrieval with the top `rerank_k` candidates re-ranked by ITM.
      matching=True,
      rerank_k=16,
      # () = an image_text_folder's train captions that name a label, with the label as
      # '{}' (else 'a photo of a {}.'); see vlm_jax/eval/runner.py prompt_templates.
      prompt_templates=('a {}', 'a small {}', 'a large {}', 'a picture of a {}'),
      # captioners (CoCa): greedy captions scored by CIDEr-D and BLEU-4 against all captions
      # of each image, and whether they name the object of single-object images; greedy
      # answers to every question of the split's images (vlm_jax/eval/captioning.py).
      captioning=True,
      vqa=True,
  )

  # every_steps: 0 = no periodic checkpoints, only at the end, at train.max_steps_per_run and
  # at a preemption notice.
  c.checkpoint = dict(every_steps=500, keep=3, async_save=True)

  # pretrained: a workdir of `python -m vlm_jax.convert` or of a training run; the trainer
  # starts from its parameters when its own workdir has no checkpoint, and evaluate uses them
  # when given. include: regexes matched (re.match) against '/'-joined parameter paths
  # ('image' = image_encoder/... and image_proj/...); () = all parameters. The model config
  # of what is loaded (towers, data.mean/std, tokenizer) comes from the pretrained workdir.
  # lm: a 'causal_lm' workdir (BLIP-2 stage 2): all its parameters become the 'lm/' subtree,
  # and model.text and the tokenizer are taken from it; loaded with `pretrained` (the image
  # tower and Q-Former of a 'blip2_qformer' workdir), which it therefore needs.
  c.init = dict(pretrained='', include=(), lm='')
  return c


# The accepted values of every numeric key, checked at load (config_utils.check_values): an
# interval in the usual notation ('[1, inf)': 1 or more; '(0, 1]'), applied to each element of
# a tuple; or (interval, {value: meaning}) for values outside it that mean something. Integer
# keys stay integers (the locked config refuses 2.5). Enumerated keys are checked against
# the registries that read them (config_utils._choices); rules between keys are in
# config_utils._CROSS_RULES.
RANGES = {
    'seed': '[0, inf)',
    # data
    'data.image_size': '[1, inf)',
    'data.max_text_len': '[2, inf)',
    'data.mean': '[0, 1]',
    'data.std': '(0, inf)',
    'data.drop_color_prob': '[0, 1]',
    'data.curriculum.steps': ('[1, inf)', {0: 'off'}),
    'data.curriculum.max_objects': '[1, inf)',
    'data.curriculum.first_caption_steps': ('[1, inf)', {0: 'off'}),
    'data.num_threads': '[1, inf)',
    'data.prefetch': '[0, inf)',
    'data.val_fraction': '[0, 1)',
    'data.test_fraction': '[0, 1)',
    'data.split_seed': '[0, inf)',
    # model
    'model.embed_dim': '[1, inf)',
    'model.image.patch_size': '[1, inf)',
    'model.image.width': '[1, inf)',
    'model.image.depth': '[1, inf)',
    'model.image.num_heads': '[1, inf)',
    'model.image.mlp_dim': '[1, inf)',
    'model.image.ln_eps': '(0, inf)',
    'model.image.dropout': '[0, 1)',
    'model.image.posemb_grid': ('[1, inf)', {0: 'the grid of data.image_size'}),
    'model.image.patch_dropout': '[0, 1)',
    'model.image.layers': '[1, inf)',
    'model.image.norm_groups': '[1, inf)',
    'model.text.vocab_size': ('[1, inf)', {0: 'from the tokenizer'}),
    'model.text.width': '[1, inf)',
    'model.text.depth': '[1, inf)',
    'model.text.num_heads': '[1, inf)',
    'model.text.mlp_dim': '[1, inf)',
    'model.text.ln_eps': '(0, inf)',
    'model.text.dropout': '[0, 1)',
    'model.text.max_len': ('[1, inf)', {0: 'data.max_text_len'}),
    'model.text.type_vocab_size': ('[1, inf)', {0: 'none'}),
    'model.fusion.width': ('[1, inf)', {0: "the text tower's width"}),
    'model.fusion.depth': '[1, inf)',
    'model.fusion.num_heads': '[1, inf)',
    'model.fusion.mlp_dim': '[1, inf)',
    'model.fusion.dropout': '[0, 1)',
    'model.fusion.ln_eps': '(0, inf)',
    'model.fusion.every': '[1, inf)',
    'model.fusion.num_queries': '[1, inf)',
    'model.decoder.unimodal_depth': '[0, inf)',
    'model.decoder.multimodal_depth': '[1, inf)',
    'model.decoder.num_queries': '[1, inf)',
    'model.temperature.init': '(-inf, inf)',  # and within [min, max]
    'model.temperature.min': '[-inf, inf]',  # -inf, inf: no bound
    'model.temperature.max': '[-inf, inf]',
    'model.temperature.bias_init': '(-inf, inf)',
    'model.lora.rank': ('[1, inf)', {0: 'off'}),
    'model.lora.alpha': '(0, inf)',
    # loss
    'loss.weights.itc': '[0, inf)',
    'loss.weights.itm': '[0, inf)',
    'loss.weights.mlm': '[0, inf)',
    'loss.weights.caption': '[0, inf)',
    'loss.weights.vqa': '[0, inf)',
    'loss.label_smoothing': '[0, 1)',
    'loss.block_size': '[1, inf)',
    'loss.itm_negative_scale': ('[0, inf)', {-1: "the model's contrastive logit scale"}),
    'loss.mlm_probability': '[0, 1]',
    'loss.mlm_word_classes.spatial.probability': '[0, 1]',
    'loss.mlm_word_classes.attribute.probability': '[0, 1]',
    'loss.mlm_word_classes.object.probability': '[0, 1]',
    'loss.mlm_word_classes.spatial.token_ids': '[0, inf)',
    'loss.mlm_word_classes.attribute.token_ids': '[0, inf)',
    'loss.mlm_word_classes.object.token_ids': '[0, inf)',
    'loss.mlm_mask_id': ('[0, inf)', {-1: "the tokenizer's"}),
    # optim
    'optim.learning_rate': '(0, inf)',
    'optim.warmup_steps': ('[1, inf)', {0: 'no warmup'}),  # and <= train.num_steps
    'optim.end_learning_rate_factor': '[0, 1]',
    'optim.b1': '[0, 1)',
    'optim.b2': '[0, 1)',
    'optim.eps': '(0, inf)',
    'optim.weight_decay': '[0, inf)',
    'optim.grad_clip_norm': ('(0, inf)', {0: 'off'}),
    # parallel
    'parallel.mesh.data': ('[1, inf)', {-1: 'the remaining devices'}),
    'parallel.mesh.fsdp': ('[1, inf)', {-1: 'the remaining devices'}),
    'parallel.mesh.tensor': ('[1, inf)', {-1: 'the remaining devices'}),
    # train
    'train.num_steps': '[0, inf)',
    'train.batch_size': '[1, inf)',
    'train.log_every_steps': '[1, inf)',
    'train.max_steps_per_run': ('[1, inf)', {0: 'no limit'}),
    'train.microbatches': '[1, inf)',  # and dividing train.batch_size
    'train.max_consecutive_skips': ('[1, inf)', {0: 'never stop'}),
    # eval
    'eval.every_steps': ('[1, inf)', {0: 'only at the end'}),
    'eval.batch_size': '[1, inf)',
    'eval.max_examples': ('[1, inf)', {0: 'the whole split'}),
    'eval.rerank_k': '[1, inf)',
    # checkpoint
    'checkpoint.every_steps': ('[1, inf)', {0: 'only at the end, at train.max_steps_per_run '
                                               'and at a preemption notice'}),
    'checkpoint.keep': '[1, inf)',
}
