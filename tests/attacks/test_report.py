from __future__ import annotations

import pytest

from fedsplit.attacks.report import pareto_frontier, recommend, validate_report


def _point(name, recovery, cost):
    return {
        "name": name,
        "head_layers": 1,
        "noise_std": 0.0,
        "adversarial_weight": 0.0,
        "heldout_loss": 1.0,
        "zero_shot_loss": 1.2,
        "quality_cost": cost,
        "token_recovery": recovery,
    }


POINTS = [
    _point("none", 0.99, 0.0),
    _point("mild", 0.60, 0.01),
    _point("strong", 0.10, 0.04),
    _point("huge", 0.01, 0.30),
    _point("dominated", 0.70, 0.02),
]


def test_frontier_keeps_only_undominated_points_by_cost():
    assert [p["name"] for p in pareto_frontier(POINTS)] == ["none", "mild", "strong", "huge"]


def test_recommendation_is_the_lowest_recovery_within_both_bounds():
    best = recommend(POINTS, max_recovery=0.2, max_quality_cost=0.05)

    assert best["name"] == "strong" and best["meets_target"] is True


def test_without_a_qualifying_point_the_recommendation_says_so():
    best = recommend(POINTS, max_recovery=0.05, max_quality_cost=0.05)

    assert best["name"] == "strong" and best["meets_target"] is False


def test_validation_names_the_missing_field():
    report = {
        "version": 1,
        "model": "m",
        "settings": {},
        "nearest_neighbour": [{"head_layers": 0, "noise_std": 0.0}],
        "learned": [],
        "gradients": [],
        "traffic": {},
        "defences": POINTS,
        "frontier": [],
        "recommended": recommend(POINTS, 0.2, 0.05),
    }

    with pytest.raises(ValueError, match=r"nearest_neighbour\[0\]: missing token_recovery"):
        validate_report(report)
    with pytest.raises(ValueError, match="traffic: expected dict, got NoneType"):
        validate_report({**report, "traffic": None})
