"""Evaluation: metrics (ROUGE, accuracy, macro-F1, intervals), scoring of a model, per-split reports.

- :mod:`~fedsplit.eval.rouge`: ROUGE-1/2/L by the ``rouge-score`` package;
- :mod:`~fedsplit.eval.stats`: accuracy, macro-F1, Wilson and bootstrap intervals, ``aggregate_metrics``;
- :mod:`~fedsplit.eval.scoring`: log-likelihoods and greedy answers of an unsplit model or any logits function;
- :mod:`~fedsplit.eval.choices`: classification records with every label's candidate answer;
- :mod:`~fedsplit.eval.evaluator`: ``evaluate_split`` (classification or generation report).

Heavy modules (torch) load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedsplit.eval.rouge import RougeScore, mean_rouge_l, rouge_l, rouge_scores

_LAZY = {
    "aggregate_metrics": "fedsplit.eval.stats",
    "wilson_interval": "fedsplit.eval.stats",
    "EvalReport": "fedsplit.eval.evaluator",
    "EvalSettings": "fedsplit.eval.evaluator",
    "evaluate_split": "fedsplit.eval.evaluator",
    "ModelAccess": "fedsplit.eval.scoring",
    "unsplit_access": "fedsplit.eval.scoring",
    "function_access": "fedsplit.eval.scoring",
    "ChoiceExample": "fedsplit.eval.choices",
    "load_choice_examples": "fedsplit.eval.choices",
}

__all__ = ["RougeScore", "mean_rouge_l", "rouge_l", "rouge_scores", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsplit.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
