"""Datasets, tokenizer and input pipelines.

  datasets  -- builders by config, building on first use, tokenizers, random-access sources
  pipeline  -- the sharded, resumable train stream and whole evaluation splits
  tokenizer -- word-level tokenizer with fixed-length batch encoding
  shapes    -- the procedural `shapes` dataset (tfds builder)
"""
from vlm_jax.data.datasets import class_names
from vlm_jax.data.datasets import data_source
from vlm_jax.data.datasets import ensure_built
from vlm_jax.data.datasets import get_builder
from vlm_jax.data.datasets import load_tokenizer
from vlm_jax.data.pipeline import eval_examples
from vlm_jax.data.pipeline import make_train_dataset
from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.data.pipeline import normalize_images
from vlm_jax.data.shapes import flip_caption
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.data.tokenizer import train_tokenizer
