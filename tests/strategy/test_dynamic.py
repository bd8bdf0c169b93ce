from __future__ import annotations

import pytest
import torch

from fedsplit.strategy import (
    BANDWIDTH_METRIC,
    AggregationError,
    ClientUpdate,
    DynamicWeight,
    FedAvg,
    cap_shares,
    dynamic_weights,
)


def test_dynamic_weights_by_hand() -> None:
    # omega = L / (n * B^alpha): 2 / (10 * 4^0.5) = 0.1; 1 / (5 * 1) = 0.2
    assert dynamic_weights([2.0, 1.0], [10, 5], [4.0, 1.0], alpha=0.5) == pytest.approx([0.1, 0.2])
    # inverse loss: (1/2) / 20 = 0.025; 1 / 5 = 0.2
    assert dynamic_weights([2.0, 1.0], [10, 5], [4.0, 1.0], alpha=0.5, loss_term="inverse") == pytest.approx(
        [0.025, 0.2]
    )
    assert dynamic_weights([2.0], [0], [4.0], alpha=1.0) == [0.0]  # no data, no weight


def test_dynamic_weight_fn_in_fedavg_matches_the_formula() -> None:
    # Arrange: omega_a = 2 / (10 * 100) = 0.002, omega_b = 1 / (10 * 25) = 0.004 -> w = (0.002*1 + 0.004*4) / 0.006 = 3
    updates = [
        ClientUpdate("a", {"k": torch.tensor([1.0])}, 10, {"loss": 2.0, BANDWIDTH_METRIC: 100.0}),
        ClientUpdate("b", {"k": torch.tensor([4.0])}, 10, {"loss": 1.0, BANDWIDTH_METRIC: 25.0}),
    ]
    strategy = FedAvg(local_steps=1, lr=0.1, weight_fn=DynamicWeight(alpha=1.0))

    out = strategy.aggregate(1, updates, [], {"k": torch.zeros(1)})

    assert out.tensors["k"].item() == pytest.approx(3.0)


def test_dynamic_weight_names_the_missing_metric() -> None:
    update = ClientUpdate("a", {"k": torch.tensor([1.0])}, 10, {"loss": 2.0})

    with pytest.raises(AggregationError, match="'a'.*bandwidth_bytes_per_s"):
        DynamicWeight(alpha=1.0)(update)
    assert DynamicWeight(alpha=0.0)(update) == pytest.approx(0.2)  # alpha 0 ignores bandwidth


def test_cap_shares_iterative_capping_by_hand() -> None:
    # 8, 1, 1 with cap 0.5: 0.5, then 0.5 split 1:1 -> 0.25, 0.25
    assert cap_shares([8, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])
    # 6, 3, 1, cap 0.4: 0.6 -> 0.4; rest 0.6 split 3:1 -> 0.45 > 0.4 -> capped; last gets 0.2
    assert cap_shares([6, 3, 1], 0.4) == pytest.approx([0.4, 0.4, 0.2])
    assert cap_shares([1, 1, 2], 1.0) == pytest.approx([0.25, 0.25, 0.5])  # no cap: plain normalization
    assert cap_shares([5, 0, 1], 0.5) == pytest.approx([0.5, 0.0, 0.5])  # zero stays zero


def test_cap_shares_infeasible_cap_gives_even_shares_and_bad_input_fails() -> None:
    assert cap_shares([100, 1], 0.3) == pytest.approx([0.5, 0.5])
    with pytest.raises(AggregationError, match="max_share"):
        cap_shares([1, 1], 0.0)
    with pytest.raises(AggregationError, match="finite weight"):
        cap_shares([1, -1], 0.5)


def test_fedavg_max_share_bounds_a_client_claiming_a_huge_dataset() -> None:
    updates = [ClientUpdate(c, {"k": torch.tensor([v])}, n, {}) for c, v, n in [("a", 0.0, 10), ("b", 0.0, 10),
                                                                                  ("liar", 100.0, 10**9)]]

    out = FedAvg(local_steps=1, lr=0.1, max_share=0.4).aggregate(1, updates, [], {"k": torch.zeros(1)})

    assert out.tensors["k"].item() == pytest.approx(40.0)  # 0.4 * 100, not ~100
    with pytest.raises(ValueError, match="max_share"):
        FedAvg(local_steps=1, lr=0.1, max_share=1.5)
