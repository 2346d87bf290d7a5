"""Objectives as the trainer sees them: `loss_fn(params, batch, rng) -> (loss, aux)`.

The contrastive loss runs in one of three ways:
  * dense (default): the global [B, B] logits under jit, partitioned by XLA;
  * `loss.sharded=True` with a `mesh`: the collective losses of `vlm_jax.losses.sharded`
    inside `jax.shard_map` over the batch mesh axes (the 'batch' rule of `parallel.rules`);
    the loss and its gradients are those of the dense loss, no gradient rescaling needed;
  * `axis_name` given (inside `jax.pmap(..., axis_name=...)`): the collective losses on the
    device's shard; the loss is global and identical on every device, and `lax.pmean` of
    the per-device gradients over `axis_name` is the single-device gradient.
"""
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax import losses
from vlm_jax.encoders.common import check_choice
from vlm_jax.losses import blip2 as blip2_losses
from vlm_jax.losses import captioning
from vlm_jax.losses import matching
from vlm_jax.losses import mlm
from vlm_jax.losses.sharded import AxisName
from vlm_jax.models import lora
from vlm_jax.models.blip2 import Blip2
from vlm_jax.models.blip2_qformer import Blip2QFormer
from vlm_jax.models.causal_lm import CausalLM
from vlm_jax.models.coca import CoCa
from vlm_jax.models.fusion_encoder import FusionEncoder
from vlm_jax.training import optimizer
from vlm_jax.training import partitioning

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
ContrastiveFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def _with_bias(name: str, fn: Callable) -> ContrastiveFn:
  """`fn` as `f(image_emb, text_emb, logit_scale, logit_bias)`; only 'sigmoid' uses the bias."""
  if name == 'sigmoid':
    return fn
  return lambda image_emb, text_emb, logit_scale, logit_bias: fn(image_emb, text_emb,
                                                                 logit_scale)


def _collective(name: str, axis_name: AxisName, block_size: int | None) -> Callable:
  """The collective loss `name` on local shards over `axis_name`; `block_size` (the
  sigmoid ring's widest column block, `loss.block_size`) is passed to 'sigmoid' only, and
  None keeps the loss's default."""
  kwargs = {'axis_name': axis_name}
  if name == 'sigmoid' and block_size is not None:
    kwargs['block_size'] = block_size
  return functools.partial(losses.get_sharded_loss(name), **kwargs)


def contrastive_terms(name: str, outputs: dict, *, axis_name: AxisName | None = None,
                      block_size: int | None = None) -> tuple[jax.Array, dict]:
  """The contrastive loss `name` ('softmax' or 'sigmoid') of dual-encoder outputs.

  With `axis_name`, `outputs` holds local shards and the collective loss is used (with
  `block_size` for the sigmoid ring, see `_collective`).
  """
  if axis_name is None:
    fn = losses.get_loss(name)
    if 'positives' in outputs:  # loss.positives other than 'pair' (sigmoid only, checked)
      fn = functools.partial(fn, positives=outputs['positives'])
  else:
    fn = _collective(name, axis_name, block_size)
  return _with_bias(name, fn)(outputs['image_emb'], outputs['text_emb'],
                              outputs['logit_scale'], outputs['logit_bias'])


def shard_mapped_contrastive(name: str, mesh: Mesh, batch_axes: AxisName, *,
                             block_size: int | None = None) -> ContrastiveFn:
  """The collective loss `name` as a global function of [B, E] embeddings (jit-able).

  Embeddings are split over `batch_axes` of `mesh`; the scalars and outputs replicate.
  `block_size`: the sigmoid ring's widest column block (None: the loss's default).
  """
  local = _with_bias(name, _collective(name, batch_axes, block_size))
  spec = P(batch_axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())


def _batch_axes(parallel_cfg) -> AxisName | None:
  """The mesh axes of the 'batch' rule, or None when the batch is not split."""
  axes = partitioning.batch_spec(parallel_cfg)[0]
  if isinstance(axes, list):
    axes = tuple(axes)
  return axes or None


POSITIVES = ('pair', 'same_text', 'same_label')


def _check_positives(config: ml_collections.ConfigDict, mesh: Mesh | None,
                     axis_name: AxisName | None) -> str:
  """`loss.positives`; raises where it is not supported."""
  positives = config.loss.positives
  check_choice('loss.positives', positives, POSITIVES)
  if positives == 'pair':
    return positives
  sharded = axis_name is not None or (config.loss.sharded and mesh is not None)
  if config.loss.name != 'sigmoid' or sharded or config.train.microbatches > 1:
    raise ValueError(f"loss.positives={positives!r} needs loss.name='sigmoid', the dense loss "
                     "(loss.sharded=False, parallel.mode='jit') and train.microbatches=1.")
  if positives == 'same_label' and not config.data.labels:
    raise ValueError("loss.positives='same_label' needs the train batches' labels: set "
                     'data.labels=True.')
  return positives


def positive_pairs(batch: dict, positives: str) -> jax.Array:
  """[B, B] bool, the pairs (image i, text j) labelled positive: identical captions and, for
  'same_label', one-object images of the same class (`batch['label']` >= 0)."""
  same = matching.identical_rows(batch['text_ids'], batch['text_mask'])
  if positives == 'same_label':
    label = batch['label']
    same = same | ((label[:, None] == label[None, :]) & (label[:, None] >= 0))
  return same


def _contrastive_fn(config: ml_collections.ConfigDict, mesh: Mesh | None,
                    axis_name: AxisName | None) -> Callable[[dict], tuple[jax.Array, dict]]:
  """Picks the dense, shard_map or pmap form of the contrastive loss (see module doc)."""
  name = config.loss.name
  block_size = config.loss.get('block_size')
  if mesh is not None and axis_name is not None:
    raise ValueError('make_loss_fn: pass `mesh` (jit) or `axis_name` (pmap), not both.')
  _check_positives(config, mesh, axis_name)
  if axis_name is not None:
    return lambda outputs: contrastive_terms(name, outputs, axis_name=axis_name,
                                             block_size=block_size)
  batch_axes = _batch_axes(config.parallel)
  if config.loss.sharded and mesh is not None and batch_axes is not None:
    fn = shard_mapped_contrastive(name, mesh, batch_axes, block_size=block_size)
    return lambda outputs: fn(outputs['image_emb'], outputs['text_emb'],
                              outputs['logit_scale'], outputs['logit_bias'])
  return lambda outputs: contrastive_terms(name, outputs)


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict, *,
                 mesh: Mesh | None = None, axis_name: AxisName | None = None) -> LossFn:
  """The training objective of `config.loss` for `model`.

  Args:
    model: a dual encoder, a fusion encoder (then see `make_fusion_loss_fn`), a captioner
      (CoCa, a causal LM, BLIP-2 stage 2: `make_captioner_loss_fn`) or BLIP-2 stage 1
      (`make_blip2_qformer_loss_fn`).
    config: the full config (reads `loss` and, for the sharded loss, `parallel.rules`).
    mesh: the jit path's mesh; used only when `loss.sharded` is true.
    axis_name: the pmap axis name; the batch passed to `loss_fn` is then the local shard.

  Returns:
    `loss_fn(params, batch, rng) -> (loss [], aux)`; the loss is the global-batch loss. The
    frozen parameters (`frozen_patterns`) are behind `stop_gradient`: their gradients are
    exact zeros, and XLA skips the backward work that only they need.
  """
  if isinstance(model, FusionEncoder):
    loss_fn = make_fusion_loss_fn(model, config, mesh=mesh, axis_name=axis_name)
  elif isinstance(model, (CoCa, CausalLM, Blip2)):
    loss_fn = make_captioner_loss_fn(model, config, mesh=mesh, axis_name=axis_name)
  elif isinstance(model, Blip2QFormer):
    loss_fn = make_blip2_qformer_loss_fn(model, config, mesh=mesh, axis_name=axis_name)
  else:
    loss_fn = _dual_encoder_loss_fn(model, config, mesh, axis_name)
  return stop_frozen_fn(loss_fn, config)


def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The regexes of the parameters the optimizer freezes: `optim.frozen` and LoRA's base
  parameters (`lora.frozen_patterns`)."""
  return (*config.optim.frozen,
          *lora.frozen_patterns(lora.spec_from_config(config.model.lora)))


def stop_frozen_fn(fn: Callable, config: ml_collections.ConfigDict) -> Callable:
  """`fn(params, *args)` with the frozen parameters of `config` behind `stop_gradient`
  (`optimizer.stop_frozen`); `fn` itself when nothing is frozen."""
  frozen = frozen_patterns(config)
  if not frozen:
    return fn
  return lambda params, *args: fn(optimizer.stop_frozen(params, frozen), *args)


def _dual_encoder_loss_fn(model: nn.Module, config: ml_collections.ConfigDict,
                          mesh: Mesh | None, axis_name: AxisName | None) -> LossFn:
  """`make_loss_fn` of a dual encoder: `make_outputs_loss_fn` of `make_embed_fn`."""
  embed_fn = make_embed_fn(model)
  outputs_loss_fn = make_outputs_loss_fn(config, mesh=mesh, axis_name=axis_name)
  positives = _check_positives(config, mesh, axis_name)

  def loss_fn(params, batch, rng):
    outputs = embed_fn(params, batch, rng)
    if positives != 'pair':
      outputs = {**outputs, 'positives': positive_pairs(batch, positives)}
    return outputs_loss_fn(outputs)

  return loss_fn


# The two halves of `loss_fn`, for gradient caching (`vlm_jax.training.accumulation`):
# loss_fn(params, batch, rng) == outputs_loss_fn(embed_fn(params, batch, rng)).

EmbedFn = Callable[[Any, dict, jax.Array], dict]
OutputsLossFn = Callable[[dict], tuple[jax.Array, dict]]


def make_embed_fn(model: nn.Module) -> EmbedFn:
  """`embed_fn(params, batch, rng) -> outputs`: the training-mode forward pass of `model`.

  For the dual encoder: image_emb [B, E], text_emb [B, E], logit_scale [], logit_bias [];
  `rng` is the dropout key.
  """

  def embed_fn(params, batch, rng):
    return model.apply({'params': params}, batch['image'], batch['text_ids'],
                       batch['text_mask'], deterministic=False, rngs={'dropout': rng})

  return embed_fn


def make_outputs_loss_fn(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                         axis_name: AxisName | None = None) -> OutputsLossFn:
  """`outputs_loss_fn(outputs) -> (loss [], aux)`: the objective of `make_loss_fn` (same
  arguments) as a function of the model's outputs on the whole batch."""
  name = config.loss.name
  contrastive = _contrastive_fn(config, mesh, axis_name)

  def outputs_loss_fn(outputs):
    loss, metrics = contrastive(outputs)
    aux = {name: loss, 'logit_scale': outputs['logit_scale'],
           'logit_bias': outputs['logit_bias'], **metrics}
    return loss, aux

  return outputs_loss_fn


def _check_weights(config: ml_collections.ConfigDict, objectives: tuple[str, ...],
                   what: str) -> None:
  """Raises if a `loss.weights` entry outside `objectives` is non-zero."""
  other = sorted(k for k, v in config.loss.weights.items() if k not in objectives and v)
  if other:
    raise ValueError(f'loss.weights {other} are not objectives of {what}; set them to 0. '
                     f'Accepted: {", ".join(objectives)}.')


def _check_whole_batch(config: ml_collections.ConfigDict, axis_name: AxisName | None,
                       what: str, why: str = '') -> None:
  """Raises unless the loss sees the whole global batch in one piece (`what`: e.g.
  'Captioners train')."""
  if axis_name is not None or config.loss.sharded or config.train.microbatches > 1:
    raise ValueError(f'{what} with parallel.mode=jit, loss.sharded=False and '
                     f'train.microbatches=1{why}.')


# Fusion models: contrastive + image-text matching + masked language modelling.

FUSION_OBJECTIVES = ('itc', 'itm', 'mlm', 'caption')


def _check_fusion_config(model: nn.Module, config: ml_collections.ConfigDict,
                         axis_name: AxisName | None) -> dict[str, float]:
  """The objectives' weights; raises for options the fusion objective does not support."""
  weights = {k: float(config.loss.weights.get(k, 0.0)) for k in FUSION_OBJECTIVES}
  _check_weights(config, FUSION_OBJECTIVES, 'fusion models')
  _check_whole_batch(config, axis_name, 'Fusion models train',
                     ' (the ITM negatives need the whole batch)')
  if weights['itm'] and not model.itm:
    raise ValueError('loss.weights.itm > 0 needs model.heads.itm=True.')
  if weights['itm'] and not config.loss.itm_batch_negatives and not config.data.hard_negatives:
    raise ValueError('loss.itm_batch_negatives=False leaves ITM only the dataset\'s false '
                     'captions: set data.hard_negatives=True.')
  if weights['mlm'] and not model.mlm:
    raise ValueError('loss.weights.mlm > 0 needs model.heads.mlm=True.')
  if weights['caption'] and not model.mlm:
    raise ValueError('loss.weights.caption > 0 reads the fused tokens with the vocabulary '
                     'head: set model.heads.mlm=True.')
  if weights['caption'] and not (config.model.text.causal and config.model.fusion.causal):
    raise ValueError('loss.weights.caption > 0 needs a causal text tower and fusion layer '
                     '(model.text.causal=True, model.fusion.causal=True): otherwise each '
                     'token sees the word it predicts. Bidirectional models ground with mlm.')
  if weights['mlm'] and config.loss.mlm_mask_id < 0:
    raise ValueError('loss.mlm_mask_id is unset and the tokenizer has no [MASK] token: set '
                     'loss.mlm_mask_id to a token id, or loss.weights.mlm=0.')
  return weights


def _itm_terms(model: nn.Module, params, outputs: dict, batch: dict, rng: jax.Array,
               dropout_rng: jax.Array, negative_scale: float,
               sample: Callable = matching.sample_hard_negatives,
               batch_negatives: bool = True) -> tuple[jax.Array, dict]:
  """ITM on the B positives, B sampled hard-negative texts and B hard-negative images
  (with `batch_negatives`) and, when the batch has them, the dataset's own false captions
  (`neg_text_ids`). `sample` draws the negatives from the contrastive embeddings
  (`matching.sample_hard_negatives`'s signature)."""
  ids, mask = batch['text_ids'], batch['text_mask']
  image_tokens, text_tokens = outputs['image_tokens'], outputs['text_tokens']
  positive = jnp.ones(ids.shape[:1], bool)
  pair_images, pair_texts, pair_masks = [image_tokens], [text_tokens], [mask]
  labels = [positive.astype(jnp.int32)]
  # Without batch negatives, only images with a false caption count as positives: ITM then
  # sees balanced pairs of a true and a false caption of one image.
  valid = [positive if batch_negatives or 'neg_valid' not in batch else batch['neg_valid']]
  if batch_negatives:
    forbidden = matching.identical_rows(ids, mask)
    scale = outputs['logit_scale'] if negative_scale < 0 else negative_scale
    neg_text, text_ok, neg_image, image_ok = sample(
        rng, outputs['image_emb'], outputs['text_emb'], scale, forbidden)
    pair_images += [image_tokens, image_tokens[neg_image]]
    pair_texts += [text_tokens[neg_text], text_tokens]
    pair_masks += [mask[neg_text], mask]
    labels += [jnp.zeros_like(labels[0])] * 2
    valid += [text_ok, image_ok]
  if 'neg_text_ids' in batch:
    neg_tokens = model.apply({'params': params}, batch['neg_text_ids'], batch['neg_text_mask'],
                             deterministic=False, rngs={'dropout': dropout_rng},
                             method=model.text_tokens)
    pair_images.append(image_tokens)
    pair_texts.append(neg_tokens)
    pair_masks.append(batch['neg_text_mask'])
    labels.append(jnp.zeros_like(labels[0]))
    valid.append(batch['neg_valid'])
  cat = lambda xs: jnp.concatenate(xs, axis=0)
  pair_mask = cat(pair_masks)
  logits = model.apply(
      {'params': params}, cat(pair_images), cat(pair_texts), pair_mask, deterministic=False,
      rngs={'dropout': jax.random.fold_in(dropout_rng, 1)},
      method=lambda m, i, t, k, deterministic: m.itm_logits(m.fuse(i, t, k, deterministic), k))
  loss, metrics = matching.itm_loss(logits, cat(labels), cat(valid).astype(jnp.float32))
  if 'neg_text_ids' in batch:  # how often the dataset's false captions are rejected
    batch_size = ids.shape[0]
    _, hard = matching.itm_loss(logits[-batch_size:], labels[-1], valid[-1])
    metrics['itm_hard_negative_accuracy'] = hard['itm_accuracy']
  return loss, metrics


def mlm_probabilities(config: ml_collections.ConfigDict) -> float | jax.Array:
  """MLM's selection probability: `loss.mlm_probability`, or [V] per token id when a word
  class of `loss.mlm_word_classes` has a probability (its `token_ids` resolved)."""
  focused = [(c.probability, c.token_ids) for c in config.loss.mlm_word_classes.values()
             if c.probability > 0]
  if not focused:
    return config.loss.mlm_probability
  for name, c in config.loss.mlm_word_classes.items():
    if c.probability > 0 and not c.token_ids:
      raise ValueError(f'loss.mlm_word_classes.{name}.probability > 0 but none of its words is '
                       'a token of the tokenizer: give words it knows, or token_ids.')
  return jnp.asarray(mlm.token_probabilities(config.model.text.vocab_size,
                                             config.loss.mlm_probability, focused))


def _mlm_terms(model: nn.Module, params, outputs: dict, batch: dict, rng: jax.Array,
               dropout_rng: jax.Array, config: ml_collections.ConfigDict,
               probability: float | jax.Array) -> tuple[jax.Array, dict]:
  """MLM of the masked captions, fused with their own images; `probability`: a number or
  [V] per token id (`mlm_probabilities`)."""
  ids, mask = batch['text_ids'], batch['text_mask']
  masked_ids, targets = mlm.mask_tokens(
      rng, ids, mask, mask_id=config.loss.mlm_mask_id,
      vocab_size=config.model.text.vocab_size, probability=probability)

  def forward(m, image_tokens, masked_ids, mask, deterministic):
    tokens = m.text_tokens(masked_ids, mask, deterministic)
    return m.mlm_logits(m.fuse(image_tokens, tokens, mask, deterministic))

  logits = model.apply({'params': params}, outputs['image_tokens'], masked_ids, mask,
                       deterministic=False, rngs={'dropout': dropout_rng}, method=forward)
  return mlm.mlm_loss(logits, ids, targets)


def _fused_caption_terms(model: nn.Module, params, outputs: dict, batch: dict,
                         dropout_rng: jax.Array, smoothing: float) -> tuple[jax.Array, dict]:
  """Next-token cross-entropy of the captions read from the causal fused stream (the
  vocabulary head of MLM on each fused token [B, L, D]): every word is predicted from the
  image and the words before it."""
  def forward(m, image_tokens, text_tokens, mask, deterministic):
    return m.mlm_logits(m.fuse(image_tokens, text_tokens, mask, deterministic))

  logits = model.apply({'params': params}, outputs['image_tokens'], outputs['text_tokens'],
                       batch['text_mask'], deterministic=False, rngs={'dropout': dropout_rng},
                       method=forward)
  loss, metrics = _next_token_loss(logits, batch['text_ids'], batch['text_mask'], smoothing)
  return loss, {'caption_accuracy': metrics['accuracy']}


def make_fusion_loss_fn(model: nn.Module, config: ml_collections.ConfigDict, *,
                        mesh: Mesh | None = None, axis_name: AxisName | None = None
                        ) -> LossFn:
  """`loss_fn(params, batch, rng)` of a fusion model: the weighted sum of the contrastive
  loss ('itc', `loss.name`), image-text matching with hard negatives ('itm') and masked
  language modelling with visual context ('mlm', grounding words masked more often with
  `loss.mlm_word_classes`) and, for causal fusion, next-token prediction on the fused
  stream ('caption'); weights from `loss.weights`.

  The aux dict holds each weighted term's unweighted value (`itc`, `itm`, `mlm`, `caption`)
  and the accuracies `itm_accuracy`, `mlm_accuracy`, `caption_accuracy`.
  """
  del mesh  # the dense loss under jit: XLA partitions it over the batch axes
  weights = _check_fusion_config(model, config, axis_name)
  name, smoothing = config.loss.name, float(config.loss.label_smoothing)
  mlm_probability = mlm_probabilities(config) if weights['mlm'] else 0.0

  def loss_fn(params, batch, rng):
    embed_rng, itm_rng, itm_dropout, mlm_rng, mlm_dropout, caption_dropout = (
        jax.random.split(rng, 6))
    outputs = model.apply({'params': params}, batch['image'], batch['text_ids'],
                          batch['text_mask'], deterministic=False, rngs={'dropout': embed_rng},
                          method=model.embed)
    aux = {'logit_scale': outputs['logit_scale'], 'logit_bias': outputs['logit_bias']}
    total = jnp.zeros((), jnp.float32)
    if weights['itc']:
      loss, metrics = contrastive_terms(name, outputs)
      total, aux = total + weights['itc'] * loss, {**aux, 'itc': loss, **metrics}
    if weights['itm']:
      loss, metrics = _itm_terms(model, params, outputs, batch, itm_rng, itm_dropout,
                                 config.loss.itm_negative_scale,
                                 batch_negatives=config.loss.itm_batch_negatives)
      total, aux = total + weights['itm'] * loss, {**aux, 'itm': loss, **metrics}
    if weights['mlm']:
      loss, metrics = _mlm_terms(model, params, outputs, batch, mlm_rng, mlm_dropout, config,
                                 mlm_probability)
      total, aux = total + weights['mlm'] * loss, {**aux, 'mlm': loss, **metrics}
    if weights['caption']:
      loss, metrics = _fused_caption_terms(model, params, outputs, batch, caption_dropout,
                                           smoothing)
      total, aux = total + weights['caption'] * loss, {**aux, 'caption': loss, **metrics}
    return total, aux

  return loss_fn


# Captioners (CoCa, causal LM, BLIP-2 stage 2): contrastive + captioning + VQA as a prefix LM.

CAPTIONER_OBJECTIVES = ('itc', 'caption', 'vqa')


def _check_captioner_config(model: nn.Module, config: ml_collections.ConfigDict,
                            axis_name: AxisName | None) -> dict[str, float]:
  """The objectives' weights; raises for options the captioner objective does not support."""
  weights = {k: float(config.loss.weights.get(k, 0.0)) for k in CAPTIONER_OBJECTIVES}
  _check_weights(config, CAPTIONER_OBJECTIVES, 'captioners (CoCa)')
  _check_whole_batch(config, axis_name, 'Captioners train')
  if weights['itc'] and not isinstance(model, CoCa):
    raise ValueError(f'loss.weights.itc > 0 needs contrastive embeddings, which a '
                     f'{type(model).__name__} does not have (CoCa does); set it to 0.')
  if weights['vqa'] and not config.data.vqa:
    raise ValueError('loss.weights.vqa > 0 needs data.vqa=True (question-answer sequences in '
                     'the batch).')
  if isinstance(model, Blip2):
    _check_frozen_image_tower(config)
  return weights


def make_captioner_loss_fn(model: nn.Module, config: ml_collections.ConfigDict, *,
                           mesh: Mesh | None = None, axis_name: AxisName | None = None
                           ) -> LossFn:
  """`loss_fn(params, batch, rng)` of a captioner: the weighted sum (`loss.weights`) of the
  contrastive loss ('itc', `loss.name`), the next-token cross-entropy of the captions
  ('caption', every token after BOS) and of the answers of `[BOS] question answer [EOS]`
  sequences ('vqa', the answer and EOS only; batches from `data.vqa=True`), both with
  `loss.label_smoothing`.

  The aux dict holds each weighted term's unweighted value and the token accuracies
  `caption_accuracy`, `vqa_accuracy`. Models without a temperature (a causal LM, BLIP-2
  stage 2) train on `caption` and `vqa` only; their `context` is the LM's prefix.
  """
  del mesh  # the dense loss under jit: XLA partitions it over the batch axes
  weights = _check_captioner_config(model, config, axis_name)
  name, smoothing = config.loss.name, float(config.loss.label_smoothing)
  next_token_loss = functools.partial(_next_token_loss, smoothing=smoothing)

  def loss_fn(params, batch, rng):
    embed_rng, vqa_rng = jax.random.split(rng)
    outputs = model.apply({'params': params}, batch['image'], batch['text_ids'],
                          batch['text_mask'], deterministic=False, rngs={'dropout': embed_rng})
    aux = {k: outputs[k] for k in ('logit_scale', 'logit_bias') if k in outputs}
    total = jnp.zeros((), jnp.float32)
    if weights['itc']:
      loss, metrics = contrastive_terms(name, outputs)
      total, aux = total + weights['itc'] * loss, {**aux, 'itc': loss, **metrics}
    if weights['caption']:
      loss, metrics = next_token_loss(outputs['caption_logits'], batch['text_ids'],
                                      batch['text_mask'])
      total = total + weights['caption'] * loss
      aux = {**aux, 'caption': loss, 'caption_accuracy': metrics['accuracy']}
    if weights['vqa']:
      logits = model.apply({'params': params}, outputs['context'], batch['vqa_ids'],
                           deterministic=False, rngs={'dropout': vqa_rng},
                           method=model.caption_logits)
      loss, metrics = next_token_loss(logits, batch['vqa_ids'], batch['vqa_loss_mask'])
      total = total + weights['vqa'] * loss
      aux = {**aux, 'vqa': loss, 'vqa_accuracy': metrics['accuracy']}
    return total, aux

  return loss_fn


def _next_token_loss(logits: jax.Array, ids: jax.Array, loss_mask: jax.Array,
                     smoothing: float) -> tuple[jax.Array, dict]:
  """Label-smoothed cross-entropy of the logits [B, L, V] of `ids` [B, L] against the next
  tokens, over the tokens of `loss_mask` [B, L]."""
  targets, target_weights = captioning.next_token_targets(ids, loss_mask)
  return captioning.caption_loss(logits, targets, target_weights, smoothing)


def _check_frozen_image_tower(config: ml_collections.ConfigDict) -> None:
  """BLIP-2 runs its image tower without gradient; unless the optimizer freezes it as well,
  AdamW's decoupled weight decay would still shrink it."""
  if not any(re.match(p, 'image_encoder/') for p in frozen_patterns(config)):
    raise ValueError("BLIP-2 keeps its image tower frozen: add 'image_encoder/' to "
                     'optim.frozen.')


# BLIP-2 stage 1: the Q-Former's contrastive, matching and image-grounded generation losses.

BLIP2_QFORMER_OBJECTIVES = ('itc', 'itm', 'caption')


def make_blip2_qformer_loss_fn(model: nn.Module, config: ml_collections.ConfigDict, *,
                               mesh: Mesh | None = None, axis_name: AxisName | None = None
                               ) -> LossFn:
  """`loss_fn(params, batch, rng)` of BLIP-2 stage 1 (`Blip2QFormer`): the weighted sum
  (`loss.weights`) of
    'itc': the contrastive loss of each image's best-matching query (the max over the
      queries' similarities), with `loss.label_smoothing` (BLIP-2: 0.1);
    'itm': matching under the bidirectional mask on the positives, hard negatives drawn from
      the batch by those similarities (scaled by `loss.itm_negative_scale`) and, with
      `data.hard_negatives`, the dataset's false captions, as for fusion models;
    'caption': image-grounded generation (ITG) under the causal mask, next-token
      cross-entropy with `loss.label_smoothing`.
  The aux dict holds each term's unweighted value and its accuracies.
  """
  del mesh  # the dense loss under jit: XLA partitions it over the batch axes
  weights = {k: float(config.loss.weights.get(k, 0.0)) for k in BLIP2_QFORMER_OBJECTIVES}
  _check_weights(config, BLIP2_QFORMER_OBJECTIVES, 'BLIP-2 stage 1 (blip2_qformer)')
  _check_whole_batch(config, axis_name, 'BLIP-2 stage 1 trains',
                     ' (the ITM negatives need the whole batch)')
  _check_frozen_image_tower(config)
  smoothing = float(config.loss.label_smoothing)

  def loss_fn(params, batch, rng):
    embed_rng, itm_rng, itm_dropout = jax.random.split(rng, 3)
    outputs = model.apply({'params': params}, batch['image'], batch['text_ids'],
                          batch['text_mask'], deterministic=False, rngs={'dropout': embed_rng})
    aux = {'logit_scale': outputs['logit_scale'], 'logit_bias': outputs['logit_bias']}
    total = jnp.zeros((), jnp.float32)
    if weights['itc']:
      loss, metrics = blip2_losses.query_max_contrastive(
          outputs['image_emb'], outputs['text_emb'], outputs['logit_scale'], smoothing)
      total, aux = total + weights['itc'] * loss, {**aux, 'itc': loss, **metrics}
    if weights['itm']:
      loss, metrics = _itm_terms(model, params, outputs, batch, itm_rng, itm_dropout,
                                 config.loss.itm_negative_scale,
                                 sample=blip2_losses.sample_hard_negatives)
      total, aux = total + weights['itm'] * loss, {**aux, 'itm': loss, **metrics}
    if weights['caption']:
      loss, metrics = _next_token_loss(outputs['caption_logits'], batch['text_ids'],
                                       batch['text_mask'], smoothing)
      total = total + weights['caption'] * loss
      aux = {**aux, 'caption': loss, 'caption_accuracy': metrics['accuracy']}
    return total, aux

  return loss_fn
