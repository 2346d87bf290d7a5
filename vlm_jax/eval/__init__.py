"""Evaluation metrics as pure functions of embeddings (zero-shot, retrieval)."""

from vlm_jax.eval.retrieval import hard_negative_accuracy
from vlm_jax.eval.retrieval import l2_normalize
from vlm_jax.eval.retrieval import positive_ranks
from vlm_jax.eval.retrieval import retrieval_metrics
from vlm_jax.eval.zeroshot import class_text_embeddings
from vlm_jax.eval.zeroshot import zeroshot_metrics

__all__ = [
    'class_text_embeddings',
    'hard_negative_accuracy',
    'l2_normalize',
    'positive_ranks',
    'retrieval_metrics',
    'zeroshot_metrics',
]
