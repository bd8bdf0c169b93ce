from __future__ import annotations

import pytest
import torch

from fedsplit.strategy import (
    AggregationError,
    ClientUpdate,
    FedAvg,
    Krum,
    Median,
    Strategy,
    TrimmedMean,
    coordinate_median,
    krum_select,
    multi_krum,
    trimmed_mean,
)
from fedsplit.strategy.robust import krum_scores


def _state(*values: float) -> dict[str, torch.Tensor]:
    return {"head/a": torch.tensor(values, dtype=torch.float32)}


def _update(cid: str, values: tuple[float, ...], loss: float = 1.0) -> ClientUpdate:
    return ClientUpdate(client_id=cid, tensors=_state(*values), num_examples=10, metrics={"loss": loss})


PLAN = FedAvg(local_steps=1, lr=0.1)


def test_median_by_hand_odd_and_even() -> None:
    odd = [_state(1, 9), _state(3, 7), _state(2, 8)]
    even = [_state(1, 0), _state(4, 0), _state(2, 0), _state(100, 1)]

    assert coordinate_median(odd)["head/a"].tolist() == [2.0, 8.0]
    assert coordinate_median(even)["head/a"].tolist() == [3.0, 0.0]  # (2 + 4) / 2, (0 + 0) / 2


def test_trimmed_mean_by_hand() -> None:
    # 5 values, beta 0.2 -> drop 1 at each end: mean(2, 3, 4) = 3 and mean(-1, 0, 1) = 0
    states = [_state(1, -50), _state(2, 0), _state(3, 1), _state(4, -1), _state(1000, 50)]

    assert trimmed_mean(states, 0.2)["head/a"].tolist() == [3.0, 0.0]
    assert trimmed_mean(states, 0.0)["head/a"].tolist() == pytest.approx([202.0, 0.0])
    with pytest.raises(AggregationError, match="beta"):
        trimmed_mean(states, 0.5)


def test_krum_scores_by_hand() -> None:
    # points 0, 1, 3, 10 on a line; n=4, f=1 -> n - f - 2 = 1 nearest neighbour
    states = [_state(0), _state(1), _state(3), _state(10)]

    assert krum_scores(states, 1) == [1.0, 1.0, 4.0, 49.0]
    assert krum_select(states, 1, 1) == [0]  # tie broken by index
    assert krum_select(states, 1, 2) == [0, 1]
    assert multi_krum(states, 1, 2)["head/a"].tolist() == [0.5]


def test_krum_needs_enough_updates() -> None:
    with pytest.raises(AggregationError, match="f \\+ 3"):
        krum_scores([_state(0), _state(1), _state(2)], 1)


@pytest.mark.parametrize(
    "strategy",
    [Median(plan=PLAN), TrimmedMean(plan=PLAN, beta=0.2), Krum(plan=PLAN, byzantine=2, selected=3)],
    ids=["median", "trimmed-mean", "multi-krum"],
)
def test_robust_rules_resist_planted_outliers(strategy: Strategy) -> None:
    # Arrange: 8 honest clients near (1, -1), 2 attackers far away (scaled and sign-flipped)
    gen = torch.Generator().manual_seed(0)
    honest = [_update(f"h{i}", tuple((torch.tensor([1.0, -1.0]) + 0.01 * torch.randn(2, generator=gen)).tolist()))
              for i in range(8)]
    attackers = [_update("x0", (1e6, 1e6), loss=99.0), _update("x1", (-1e3, 1e3), loss=99.0)]
    current = _state(0, 0)

    # Act
    robust = strategy.aggregate(1, honest + attackers, [], current)
    plain = PLAN.aggregate(1, honest + attackers, [], current)

    # Assert
    assert torch.allclose(robust.tensors["head/a"], torch.tensor([1.0, -1.0]), atol=0.05)
    assert plain.tensors["head/a"].abs().max() > 1e4  # FedAvg is dragged away
    assert robust.tensors["head/a"].dtype == torch.float32


def test_krum_reports_the_metrics_of_the_kept_clients_only() -> None:
    results = [_update(f"h{i}", (float(i) * 0.01,), loss=1.0) for i in range(4)] + [_update("x", (50.0,), loss=9.0)]

    out = Krum(plan=PLAN, byzantine=1, selected=3).aggregate(2, results, [], _state(0))

    assert out.metrics["loss"] == 1.0 and out.metrics["num_kept"] == 3
    assert out.clients == ["h0", "h1", "h2", "h3", "x"]


def test_krum_zero_selected_means_n_minus_f() -> None:
    results = [_update(f"c{i}", (float(i),)) for i in range(6)]

    out = Krum(plan=PLAN, byzantine=2, selected=0).aggregate(1, results, [], _state(0))

    assert out.metrics["num_kept"] == 4


def test_robust_strategies_are_not_linear_and_keep_sampling() -> None:
    strategy = Median(plan=FedAvg(local_steps=3, lr=0.5, fraction=0.5, seed=1))

    plan = strategy.configure_round(1, ["a", "b", "c", "d"])

    assert Median.linear is False and Krum.linear is False and TrimmedMean.linear is False
    assert len(plan.client_ids) == 2 and plan.settings == {"local_steps": 3, "lr": 0.5}
    assert isinstance(strategy, Strategy)
