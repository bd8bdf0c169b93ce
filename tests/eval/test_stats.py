from __future__ import annotations

import math

import numpy as np
import pytest

from fedsplit.eval.stats import (
    aggregate_metrics,
    bootstrap_interval,
    confusion_matrix,
    confusion_metrics,
    macro_f1,
    macro_f1_interval,
    mean_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_the_textbook_values(successes, n, low, high) -> None:
    got = wilson_interval(successes, n)

    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="expected 0 <= successes <= n"):
        wilson_interval(5, 4)


def test_confusion_matrix_and_macro_f1_hand_computed() -> None:
    # class 0: tp 1, gold 2, predicted 2 -> F1 1/2; class 1: tp 2, gold 2, predicted 3 -> 4/5; class 2: never right -> 0
    gold, predicted = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]

    matrix = confusion_matrix(gold, predicted, 3)

    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert macro_f1(matrix) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_leaves_out_classes_that_never_occur() -> None:
    matrix = confusion_matrix([0, 1], [0, 1], 3)  # class 2: no gold, never predicted

    assert macro_f1(matrix) == 1.0


def test_bootstrap_is_reproducible_and_brackets_the_estimate() -> None:
    values = np.linspace(0, 1, 50)

    first, again = mean_interval(values, seed=3), mean_interval(values, seed=3)

    assert first == again
    assert first[0] < values.mean() < first[1]
    assert bootstrap_interval(lambda idx: 1.0, 10) == (1.0, 1.0)


def test_macro_f1_interval_brackets_the_estimate() -> None:
    gold = [0, 1, 2] * 10
    predicted = [0, 1, 1] * 10

    low, high = macro_f1_interval(gold, predicted, 3)

    assert low <= macro_f1(confusion_matrix(gold, predicted, 3)) <= high


def _classification(gold, predicted):
    n = len(gold)
    metrics = {"n": float(n), "accuracy": sum(g == p for g, p in zip(gold, predicted, strict=True)) / n,
               "macro_f1": macro_f1(confusion_matrix(gold, predicted, 3)), "macro_f1_ci_low": 0.0}
    metrics.update(confusion_metrics(confusion_matrix(gold, predicted, 3)))
    return metrics, n


def test_aggregate_metrics_equals_the_pooled_classification_metrics() -> None:
    gold, predicted = [0, 1, 2, 2, 1, 0, 0, 1, 2, 1], [0, 1, 1, 2, 1, 2, 0, 0, 2, 1]
    parts = [slice(0, 3), slice(3, 4), slice(4, 10)]

    pooled = aggregate_metrics([_classification(gold[s], predicted[s]) for s in parts])
    expected, _ = _classification(gold, predicted)

    assert pooled["n"] == 10
    assert pooled["accuracy"] == pytest.approx(expected["accuracy"])
    assert pooled["macro_f1"] == pytest.approx(expected["macro_f1"])  # not the mean of the parts' F1s
    assert (pooled["accuracy_ci_low"], pooled["accuracy_ci_high"]) == pytest.approx(wilson_interval(7, 10))
    assert "macro_f1_ci_low" not in pooled  # a bootstrap interval needs the examples themselves


def test_aggregate_metrics_weights_loss_by_tokens_and_means_by_examples() -> None:
    a = ({"n": 2.0, "loss": 1.0, "tokens": 30.0, "rougeL": 0.5, "perplexity": math.e}, 2)
    b = ({"n": 6.0, "loss": 3.0, "tokens": 10.0, "rougeL": 0.1, "perplexity": math.e**3}, 6)

    pooled = aggregate_metrics([a, b])

    assert pooled["loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert pooled["perplexity"] == pytest.approx(math.exp(1.5))
    assert pooled["tokens"] == 40
    assert pooled["rougeL"] == pytest.approx((2 * 0.5 + 6 * 0.1) / 8)


def test_aggregate_metrics_needs_a_result() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        aggregate_metrics([({"accuracy": 1.0}, 0)])
