"""Metric arithmetic: accuracy, macro-F1, confidence intervals, and pooling per-client metrics.

FL-GLM (arXiv 2406.14898) reports accuracy on SuperGLUE and ROUGE on summarization; with a few
hundred held-out examples those numbers move by several points between runs, so every metric here
comes with a 95 % interval: Wilson's score interval for proportions (accuracy, exact match) and a
percentile bootstrap with a fixed seed for the rest (macro-F1, ROUGE).

Metric dicts are flat ``{name: float}`` (they travel as they are, e.g. in a protobuf map). A
confusion matrix is stored as ``cm.<gold>.<predicted>`` counts so that :func:`aggregate_metrics`
can pool per-client results *exactly*: the pooled macro-F1 comes from the summed matrix, the loss
is weighted by supervised tokens, every mean by examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
PROPORTIONS = ("accuracy", "accuracy_norm", "exact_match")  # intervals by Wilson's formula
CONFUSION_PREFIX = "cm."
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: expected 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = gold class, column = predicted class."""
    if len(gold) != len(predicted):
        raise ValueError(f"confusion_matrix: expected one prediction per label, got {len(predicted)} and {len(gold)}")
    g, p = np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if g.size and (min(g.min(), p.min()) < 0 or max(g.max(), p.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: expected class ids in 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(matrix: np.ndarray) -> float:
    """Unweighted mean over classes of F1, over the classes that occur as gold or prediction.

    A class that never occurs (no gold example, never predicted) is left out, as scikit-learn does
    when ``labels`` is not given; its F1 would be 0/0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    gold, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (gold + predicted) > 0
    if not present.any():
        raise ValueError("macro_f1: expected at least one example, got an empty confusion matrix")
    f1 = 2 * tp[present] / (gold[present] + predicted[present])
    return float(f1.mean())


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap: ``statistic(indices)`` over ``resamples`` resamples of ``range(n)``."""
    if n < 1:
        raise ValueError(f"bootstrap_interval: expected n >= 1, got {n}")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], *, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-example ``values`` (e.g. ROUGE)."""
    array = np.asarray(values, dtype=np.float64)
    return bootstrap_interval(lambda idx: float(array[idx].mean()), len(array), seed=seed)


def macro_f1_interval(
    gold: Sequence[int], predicted: Sequence[int], num_classes: int, *, seed: int = 0
) -> tuple[float, float]:
    g, p = np.asarray(gold), np.asarray(predicted)
    return bootstrap_interval(lambda idx: macro_f1(confusion_matrix(g[idx], p[idx], num_classes)), len(g), seed=seed)


def confusion_metrics(matrix: np.ndarray) -> dict[str, float]:
    """The matrix as flat ``cm.<gold>.<predicted>`` entries."""
    size = matrix.shape[0]
    return {f"{CONFUSION_PREFIX}{i}.{j}": float(matrix[i, j]) for i in range(size) for j in range(size)}


def confusion_from_metrics(metrics: Mapping[str, float]) -> np.ndarray | None:
    cells = {tuple(int(x) for x in k[len(CONFUSION_PREFIX):].split(".")): v
             for k, v in metrics.items() if k.startswith(CONFUSION_PREFIX)}
    if not cells:
        return None
    size = max(max(i, j) for i, j in cells) + 1
    matrix = np.zeros((size, size))
    for (i, j), value in cells.items():
        matrix[i, j] = value
    return matrix


def with_wilson(metrics: dict[str, float], n: int) -> dict[str, float]:
    """Add ``<name>_ci_low/high`` for every proportion in ``metrics`` (rounded to whole successes)."""
    for name in PROPORTIONS:
        if name in metrics:
            metrics[name + CI_LOW], metrics[name + CI_HIGH] = wilson_interval(round(metrics[name] * n), n)
    return metrics


def aggregate_metrics(results: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Pool per-client evaluations ``[(metrics, num_examples), ...]`` into what one evaluation of
    all their examples together gives (the server's federated-evaluation aggregate).

    - means over examples (accuracy, exact match, ROUGE, ...): weighted by ``num_examples``;
    - ``loss``: weighted by ``tokens`` (supervised tokens) when every result has it; ``perplexity``
      is ``exp`` of the pooled loss; ``tokens`` and ``cm.*`` counts are summed;
    - ``macro_f1``: recomputed from the summed confusion matrix (a mean of F1s would be wrong);
    - Wilson intervals are recomputed from the pooled proportions; bootstrap intervals need the
      examples themselves and are dropped.
    """
    results = [(m, n) for m, n in results if n > 0]
    if not results:
        raise ValueError("aggregate_metrics: expected at least one result with num_examples > 0, got none")
    total = sum(n for _, n in results)
    names = sorted({k for m, _ in results for k in m})
    pooled: dict[str, float] = {"n": float(total)}
    for name in names:
        if name in ("n", "perplexity") or name.endswith((CI_LOW, CI_HIGH)):
            continue
        reporters = [(m[name], m, n) for m, n in results if name in m]
        if name == "tokens" or name.startswith(CONFUSION_PREFIX):
            pooled[name] = float(sum(v for v, _, _ in reporters))
        elif name == "loss" and all("tokens" in m for _, m, _ in reporters):
            tokens = sum(m["tokens"] for _, m, _ in reporters)
            pooled[name] = sum(v * m["tokens"] for v, m, _ in reporters) / tokens
        else:
            pooled[name] = sum(v * n for v, _, n in reporters) / sum(n for _, _, n in reporters)
    if "loss" in pooled:
        pooled["perplexity"] = math.exp(pooled["loss"])
    matrix = confusion_from_metrics(pooled)
    if matrix is not None and "macro_f1" in pooled:
        pooled["macro_f1"] = macro_f1(matrix)
    return with_wilson(pooled, total)
