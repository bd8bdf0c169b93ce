"""DP-FedAvg: clipping, distributed noise, the accountant, the budget."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.aggregation.dp import (
    DPFedAvg,
    PrivacyAccountant,
    PrivacyBudgetWarning,
    clip_update,
    privatize_update,
    uniform_weight,
)
from fedsplit.aggregation.errors import PrivacyBudgetExceededError
from fedsplit.strategy import ClientUpdate, FedAvg

pytest.importorskip("dp_accounting", reason="the accountant needs dp-accounting")

CURRENT = {"head/a": torch.zeros(100), "tail/b": torch.ones(50)}


def _update(cid: str, scale: float) -> ClientUpdate:
    gen = torch.Generator().manual_seed(hash(cid) % 1000)
    return ClientUpdate(cid, {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in CURRENT.items()}, 10, {})


def test_clip_update_bounds_the_joint_norm_and_keeps_small_updates() -> None:
    big = _update("a", 1.0)
    clipped, norm = clip_update(big.tensors, CURRENT, 2.0)
    delta = math.sqrt(sum(float((clipped[k] - CURRENT[k]).pow(2).sum()) for k in CURRENT))
    assert norm > 2.0 and delta == pytest.approx(2.0, rel=1e-5)
    small = _update("b", 0.001)
    same, _ = clip_update(small.tensors, CURRENT, 2.0)
    assert all(torch.allclose(same[k], small.tensors[k]) for k in CURRENT)


def test_distributed_noise_sums_to_the_central_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    n, clip, z = 8, 1.0, 2.0
    noises = [privatize_update(CURRENT, CURRENT, clip=clip, noise_multiplier=z, expected_clients=n, generator=gen)
              for _ in range(n)]
    total = sum(torch.cat([(x[k] - CURRENT[k]).double() for k in CURRENT]) for x in noises)
    assert float(total.std()) == pytest.approx(z * clip, rel=0.15)  # 150 samples of N(0, (zC)^2)


def test_central_dp_adds_noise_and_reports_epsilon_each_round() -> None:
    strategy = DPFedAvg(FedAvg(local_steps=1, lr=0.1, weight_fn=uniform_weight), clip=0.5, noise_multiplier=1.0,
                        delta=1e-5)
    ids = [f"c{i}" for i in range(4)]
    plan = strategy.configure_round(0, ids)
    assert plan.settings["dp_clip"] == 0.5 and plan.settings["dp_noise"] == "central"
    first = strategy.aggregate(0, [_update(c, 1.0) for c in ids], [], CURRENT)
    strategy.configure_round(1, ids)
    second = strategy.aggregate(1, [_update(c, 1.0) for c in ids], [], CURRENT)
    assert 0 < first.metrics["dp_epsilon"] < second.metrics["dp_epsilon"] < math.inf
    assert first.metrics["dp_clipped_fraction"] == 1.0 and first.metrics["dp_noise_std"] == pytest.approx(0.5 / 4)
    assert not torch.equal(first.tensors["head/a"], second.tensors["head/a"])


def test_budget_stops_before_releasing_or_warns() -> None:
    inner = FedAvg(local_steps=1, lr=0.1, weight_fn=uniform_weight)
    strict = DPFedAvg(inner, clip=1.0, noise_multiplier=0.5, delta=1e-5, epsilon_budget=1.0)
    strict.configure_round(0, ["a", "b"])
    with pytest.raises(PrivacyBudgetExceededError, match="over the budget"):
        strict.aggregate(0, [_update("a", 0.1), _update("b", 0.1)], [], CURRENT)
    assert strict.accountant.rounds == 0  # the refused round was not spent
    lenient = DPFedAvg(inner, clip=1.0, noise_multiplier=0.5, delta=1e-5, epsilon_budget=1.0, on_budget="warn")
    lenient.configure_round(0, ["a", "b"])
    with pytest.warns(PrivacyBudgetWarning):
        lenient.aggregate(0, [_update("a", 0.1), _update("b", 0.1)], [], CURRENT)


def test_distributed_noise_charges_missing_clients() -> None:
    inner = FedAvg(local_steps=1, lr=0.1, weight_fn=uniform_weight)
    strategy = DPFedAvg(inner, clip=1.0, noise_multiplier=1.0, delta=1e-5, noise="distributed", expected_clients=4)
    plan = strategy.configure_round(0, ["a", "b", "c", "d"])
    assert plan.settings["dp_expected_clients"] == 4
    result = strategy.aggregate(0, [_update("a", 0.1)], [], CURRENT)  # 1 of 4 made it: a quarter of the noise
    assert result.metrics["dp_noise_multiplier"] == pytest.approx(0.5)
    assert torch.equal(result.tensors["head/a"], _update("a", 0.1).tensors["head/a"])  # the server adds nothing


def test_accountant_matches_known_values_and_requires_uniform_weights() -> None:
    accountant = PrivacyAccountant(1e-5)
    assert accountant.epsilon() == 0.0
    for _ in range(10):
        accountant.record(1.0, 1.0)
    # RDP of 10 Gaussian mechanisms (sigma 1) at delta 1e-5 is about 19 (dp-accounting)
    assert accountant.epsilon() == pytest.approx(19.05, rel=0.05)
    with pytest.raises(ValueError, match="uniform_weight"):
        DPFedAvg(FedAvg(local_steps=1, lr=0.1), clip=1.0, noise_multiplier=1.0, delta=1e-5)


def test_distributed_noise_goes_through_secure_aggregation() -> None:
    from fedsplit.aggregation.rounds import run_round
    from fedsplit.aggregation.secagg import SecAggParams

    gen = torch.Generator().manual_seed(1)
    noisy = [ClientUpdate(u.client_id, privatize_update(u.tensors, CURRENT, clip=1.0, noise_multiplier=1.0,
                                                        expected_clients=4, generator=gen), 1, {})
             for u in (_update(f"c{i}", 0.5) for i in range(4))]
    report = run_round("secagg", noisy, secagg=SecAggParams(threshold=3))
    plain = run_round("plain", noisy)
    assert max(float((report.tensors[k] - plain.tensors[k]).abs().max()) for k in CURRENT) <= report.error_bound + 1e-6
