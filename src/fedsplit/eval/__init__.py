"""Evaluation metrics for generated text."""

from __future__ import annotations

from fedsplit.eval.rouge import RougeScore, mean_rouge_l, rouge_l

__all__ = ["RougeScore", "mean_rouge_l", "rouge_l"]
