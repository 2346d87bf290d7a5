"""Inference: autoregressive decoding (greedy, sampling, beam search) over a cached step."""

from vlm_jax.inference.decoding import beam_search
from vlm_jax.inference.decoding import BeamDecoded
from vlm_jax.inference.decoding import decode_loop
from vlm_jax.inference.decoding import Decoded
from vlm_jax.inference.decoding import filter_logits
from vlm_jax.inference.decoding import greedy
from vlm_jax.inference.decoding import sample

__all__ = [
    'BeamDecoded',
    'Decoded',
    'beam_search',
    'decode_loop',
    'filter_logits',
    'greedy',
    'sample',
]
