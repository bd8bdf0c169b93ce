"""ROUGE-1, ROUGE-2 and ROUGE-L (Lin, 2004), the generation metrics FL-GLM (arXiv 2406.14898) reports.

Computed by the reference ``rouge-score`` package (Google's re-implementation of the original Perl
script) without stemming: text is lowercased and every run of characters outside ``[a-z0-9]``
separates tokens. Precision is over the prediction, recall over the reference; if either has no
tokens all numbers are 0. Every ROUGE number fedsplit prints comes from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    f1: float


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_scores(prediction: str, reference: str) -> dict[str, RougeScore]:
    """ROUGE-1/2/L precision, recall and F1 of ``prediction`` against ``reference``."""
    scores = _scorer().score(reference, prediction)  # rouge_score's order: (target, prediction)
    return {name: RougeScore(s.precision, s.recall, s.fmeasure) for name, s in scores.items()}


def rouge_l(prediction: str, reference: str) -> RougeScore:
    """ROUGE-L precision, recall and F1 of ``prediction`` against ``reference``."""
    return rouge_scores(prediction, reference)["rougeL"]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            "expected as many predictions as references, "
            f"got {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise ValueError("expected at least one prediction/reference pair, got none")


def rouge_f1_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per ROUGE type, the F1 of each aligned prediction/reference pair."""
    _check_pairs(predictions, references)
    per_type: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in rouge_scores(prediction, reference).items():
            per_type[name].append(score.f1)
    return per_type


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over aligned prediction/reference pairs."""
    _check_pairs(predictions, references)
    return sum(rouge_l(p, r).f1 for p, r in zip(predictions, references, strict=True)) / len(predictions)
