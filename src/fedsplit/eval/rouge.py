"""ROUGE-L (Lin, 2004), the generation metric FL-GLM (arXiv 2406.14898) reports.

Matches the ``rouge_score`` package's ``rougeL`` without stemming: text is lowercased, every run
of characters outside ``[a-z0-9]`` separates tokens, and the score is the longest common
subsequence of the token lists. Precision is over the prediction, recall over the reference;
if either has no tokens all three numbers are 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    f1: float


def tokenize(text: str) -> list[str]:
    """Lowercased ASCII-alphanumeric tokens, as ``rouge_score``'s default tokenizer makes them."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence; O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            if token == other:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> RougeScore:
    """ROUGE-L precision, recall and F1 of ``prediction`` against ``reference``."""
    predicted, expected = tokenize(prediction), tokenize(reference)
    if not predicted or not expected:
        return RougeScore(precision=0.0, recall=0.0, f1=0.0)
    common = lcs_length(expected, predicted)
    precision, recall = common / len(predicted), common / len(expected)
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    return RougeScore(precision=precision, recall=recall, f1=f1)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over aligned prediction/reference pairs."""
    if len(predictions) != len(references):
        raise ValueError(
            "expected as many predictions as references, "
            f"got {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise ValueError("expected at least one prediction/reference pair, got none")
    return sum(rouge_l(p, r).f1 for p, r in zip(predictions, references)) / len(predictions)
