"""The PyTorch peer: Hugging Face `CLIPModel` of a config's architecture, trained with AdamW.

Random weights from a `CLIPConfig` with the config's tower sizes; the same batch size, image
size and text length as the JAX benchmark; `torch.set_num_threads(os.cpu_count())`.
`build_step` returns one train step as a callable that returns when the step is done (CUDA
synchronised), which `run.py` times alternately with the JAX step; `examples_per_sec` times
it alone (median step time). CLIPModel runs each tower's last block on every token, where
vlm_jax's dual encoder runs it on the pooled token alone (its other outputs are unused; see
`vlm_jax.nn.transformer.Encoder`): same losses and gradients, fewer FLOPs, and part of
`speedup_vs_torch`.
Needs `torch` and `transformers` (not dependencies of vlm_jax):

  pip install torch==2.13.0 transformers
"""
import contextlib
import os
import statistics
import time
from typing import Any, Callable


def available() -> bool:
  """Whether torch and transformers import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def differences(config) -> list[str]:
  """Options of `config.model` that CLIPModel does not have (the peer then differs)."""
  model = config.model
  expected = {'model.image.pool': (model.image.pool, 'cls'),
              'model.image.posemb': (model.image.posemb, 'learn'),
              'model.image.ln_pre': (model.image.ln_pre, True),
              'model.image.patch_bias': (model.image.patch_bias, False),
              'model.text.pool': (model.text.pool, 'eot'),
              'model.text.causal': (model.text.causal, True),
              'loss.name': (config.loss.name, 'softmax')}
  return [f'{key}={value!r} (CLIP: {clip!r})' for key, (value, clip) in expected.items()
          if value != clip]


def _activation(tower) -> str:
  return 'quick_gelu' if tower.quick_gelu else 'gelu'


def clip_config(config, vocab_size: int):
  """A `transformers.CLIPConfig` of the same architecture as `config.model`.

  The EOS id is the last id of the vocabulary: inside it, and not 2, which would make
  CLIPTextTransformer pool at the largest id instead of at the first EOS token.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  image, text = config.model.image, config.model.text
  eos = vocab_size - 1
  text_config = dict(
      vocab_size=vocab_size, hidden_size=text.width, intermediate_size=text.mlp_dim,
      num_hidden_layers=text.depth, num_attention_heads=text.num_heads,
      max_position_embeddings=config.data.max_text_len, hidden_act=_activation(text),
      layer_norm_eps=text.ln_eps, attention_dropout=0.0, projection_dim=config.model.embed_dim,
      pad_token_id=0, bos_token_id=min(1, eos - 1), eos_token_id=eos)
  vision_config = dict(
      hidden_size=image.width, intermediate_size=image.mlp_dim,
      num_hidden_layers=image.depth, num_attention_heads=image.num_heads, num_channels=3,
      image_size=config.data.image_size, patch_size=image.patch_size,
      hidden_act=_activation(image), layer_norm_eps=image.ln_eps, attention_dropout=0.0,
      projection_dim=config.model.embed_dim)
  return transformers.CLIPConfig(text_config=text_config, vision_config=vision_config,
                                 projection_dim=config.model.embed_dim)


def synthetic_inputs(config, vocab_size: int, device) -> dict[str, Any]:
  """Random pixels (NCHW) and ids ending in EOS, with a full attention mask."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  batch, size, length = config.train.batch_size, config.data.image_size, config.data.max_text_len
  ids = torch.randint(1, max(vocab_size - 1, 2), (batch, length), generator=generator)
  ids[:, -1] = vocab_size - 1  # EOS: where CLIP pools the text
  pixels = torch.randn((batch, 3, size, size), generator=generator)
  return {'input_ids': ids.to(device), 'pixel_values': pixels.to(device),
          'attention_mask': torch.ones((batch, length), dtype=torch.long, device=device)}


def build_step(config, vocab_size: int) -> tuple[Callable[[], None], int]:
  """(`step`, batch size): `step()` runs one CLIPModel + AdamW train step on fixed inputs.

  Each call returns once the step is done (CUDA synchronised on a GPU), so it can be timed
  from outside; the model and optimizer state persist across calls.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  for difference in differences(config):
    print(f'PyTorch peer differs from the JAX model: {difference}')
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = transformers.CLIPModel(clip_config(config, vocab_size)).to(device)
  model.train()
  optim = config.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=optim.learning_rate,
                                betas=(optim.b1, optim.b2), eps=optim.eps,
                                weight_decay=optim.weight_decay)
  inputs = synthetic_inputs(config, vocab_size, device)
  half = config.model.dtype == 'bfloat16'
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if half
                else contextlib.nullcontext())
    with autocast:
      loss = model(**inputs, return_loss=True).loss
    loss.backward()
    if optim.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip_norm)
    optimizer.step()
    sync()

  return step, config.train.batch_size


def examples_per_sec(config, vocab_size: int, steps: int = 20, warmup: int = 3) -> float:
  """Examples/s of CLIPModel + AdamW training steps (median step time) on the config's batch."""
  step, batch_size = build_step(config, vocab_size)
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return batch_size / statistics.median(times)
