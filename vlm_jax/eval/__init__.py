"""Evaluation metrics as pure functions of embeddings (zero-shot, retrieval) and of texts
(captioning: BLEU-4, CIDEr-D; VQA accuracy)."""

from vlm_jax.eval.caption_metrics import bleu4
from vlm_jax.eval.caption_metrics import cider_d
from vlm_jax.eval.caption_metrics import cider_d_scores
from vlm_jax.eval.retrieval import hard_negative_accuracy
from vlm_jax.eval.retrieval import l2_normalize
from vlm_jax.eval.retrieval import positive_ranks
from vlm_jax.eval.retrieval import retrieval_metrics
from vlm_jax.eval.vqa_metrics import normalize_answer
from vlm_jax.eval.vqa_metrics import vqa_accuracy
from vlm_jax.eval.zeroshot import class_text_embeddings
from vlm_jax.eval.zeroshot import templates_from_captions
from vlm_jax.eval.zeroshot import zeroshot_metrics

__all__ = [
    'bleu4',
    'cider_d',
    'cider_d_scores',
    'class_text_embeddings',
    'hard_negative_accuracy',
    'l2_normalize',
    'normalize_answer',
    'positive_ranks',
    'retrieval_metrics',
    'templates_from_captions',
    'vqa_accuracy',
    'zeroshot_metrics',
]
