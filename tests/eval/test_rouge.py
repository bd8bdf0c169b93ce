from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from fedsplit.eval import RougeScore, mean_rouge_l, rouge_l
from fedsplit.eval.rouge import rouge_f1_per_example, rouge_scores

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("The Cat, sat!", "the cat sat"),
    ("a b c d e f", "f e d c b a"),
    ("completely different words", "nothing in common here"),
    ("", "the reference"),
    ("the prediction", ""),
    ("", ""),
    ("!!! ...", "punctuation only ???"),
    ("Café naïve résumé 2024", "cafe naive resume 2024"),
    ("repeat repeat repeat", "repeat"),
    ("Police killed the gunman.", "The gunman was shot down by police."),
    ("line one\nline two\ttabbed", "line   two line one"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_equals_the_reference_implementation(prediction: str, reference: str) -> None:
    # Arrange
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(reference, prediction)["rougeL"]  # (target, prediction) order

    # Act
    got = rouge_l(prediction, reference)

    # Assert
    assert got.precision == pytest.approx(expected.precision, abs=1e-12)
    assert got.recall == pytest.approx(expected.recall, abs=1e-12)
    assert got.f1 == pytest.approx(expected.fmeasure, abs=1e-12)


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat is on the mat", "the cat sat on the mat") = the cat on the mat = 5 of 6
    score = rouge_l("the cat sat on the mat", "the cat is on the mat")

    assert score == RougeScore(precision=5 / 6, recall=5 / 6, f1=5 / 6)


def test_precision_is_over_the_prediction_and_recall_over_the_reference() -> None:
    score = rouge_l("a b", "a b c d")

    assert (score.precision, score.recall) == (1.0, 0.5)


def test_rouge_1_and_2_hand_computed() -> None:
    # unigrams: 5 of 6 shared; bigrams shared: the-cat, on-the, the-mat = 3 of 5
    scores = rouge_scores("the cat sat on the mat", "the cat is on the mat")

    assert scores["rouge1"].f1 == pytest.approx(5 / 6)
    assert scores["rouge2"].f1 == pytest.approx(3 / 5)


def test_rouge_f1_per_example_lists_every_type() -> None:
    per = rouge_f1_per_example(["a b", "x"], ["a b", "y"])

    assert per == {"rouge1": [1.0, 0.0], "rouge2": [1.0, 0.0], "rougeL": [1.0, 0.0]}


def test_mean_rouge_l_averages_f1() -> None:
    mean = mean_rouge_l(["a b", "x"], ["a b", "y"])

    assert mean == 0.5


def test_mean_rouge_l_rejects_length_mismatch_and_empty_input() -> None:
    with pytest.raises(ValueError, match="expected as many predictions as references, got 2 and 1"):
        mean_rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        mean_rouge_l([], [])
