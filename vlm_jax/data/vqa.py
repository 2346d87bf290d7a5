"""Question-answer sequences for generative VQA, as a prefix LM.

Training rows are `[BOS] question answer [EOS] [PAD]...` with a loss mask on the answer and
EOS only; at evaluation the model reads `[BOS] question` as its prompt and generates the
answer. Questions end with '?', which the tokenizer splits off, so the answer's tokens are
the same whether the question comes before it or not.
"""
from typing import Sequence

import numpy as np

from vlm_jax.data import tokenizer as tokenizer_lib


def _check(questions: Sequence[str], answers: Sequence[str] | None = None) -> None:
  if isinstance(questions, str):
    raise TypeError(f'Expected a sequence of questions, not one string: {questions!r}.')
  if answers is not None and len(answers) != len(questions):
    raise ValueError(f'{len(questions)} questions but {len(answers)} answers.')


def question_prompts(tokenizer: tokenizer_lib.Tokenizer, questions: Sequence[str],
                     max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts for generation: ids int32 [B, max_len] (`[BOS] question ...`) and prompt_len
  int32 [B], the number of tokens of each row to read before generating (BOS + question)."""
  _check(questions)
  ids, mask = tokenizer.encode_batch(list(questions), max_len)
  return ids, (mask.sum(axis=1) - 1).astype(np.int32)  # the encoded EOS is not in the prompt


def vqa_sequences(tokenizer: tokenizer_lib.Tokenizer, questions: Sequence[str],
                  answers: Sequence[str], max_len: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training rows of B question-answer pairs.

  Returns:
    ids int32 [B, L] (`[BOS] question answer [EOS] [PAD]...`), mask bool [B, L] (real
    tokens), loss_mask bool [B, L] (the answer and EOS: the tokens to predict).
  """
  _check(questions, answers)
  ids, mask = tokenizer.encode_batch([f'{q} {a}' for q, a in zip(questions, answers)],
                                     max_len)
  _, prompt_len = question_prompts(tokenizer, questions, max_len)
  loss_mask = mask & (np.arange(max_len)[None, :] >= prompt_len[:, None])
  return ids, mask, loss_mask
