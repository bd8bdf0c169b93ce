from __future__ import annotations

import math

import pytest
import torch

from fedsplit.strategy import ClientUpdate, FedAvg, FedOpt, server_opt_step
from fedsplit.strategy.fedopt import ServerOptState

KW = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_first_step_by_hand(kind: str) -> None:
    # delta = 2 - 0 = 2; m = 0.1 * 2 = 0.2; v0 = tau^2 = 1e-4
    v = {"adam": 0.99e-4 + 0.01 * 4, "adagrad": 1e-4 + 4, "yogi": 1e-4 + 0.01 * 4}[kind]  # yogi: sign(1e-4 - 4) = -1
    state = ServerOptState()

    out = server_opt_step({"k": torch.tensor([0.0])}, {"k": torch.tensor([2.0])}, state, kind=kind, **KW)

    assert out["k"].item() == pytest.approx(0.1 * 0.2 / (math.sqrt(v) + 0.01), rel=1e-6)
    assert state.v["k"].item() == pytest.approx(v)


def test_second_step_uses_the_moments() -> None:
    state = ServerOptState()
    x1 = server_opt_step({"k": torch.tensor([0.0])}, {"k": torch.tensor([1.0])}, state, kind="adam", **KW)
    # delta2 = 1 - x1; m2 = 0.9 * 0.1 + 0.1 * delta2; v2 = 0.99 * v1 + 0.01 * delta2^2
    d2 = 1.0 - x1["k"].item()
    m2 = 0.9 * 0.1 + 0.1 * d2
    v1 = 0.99 * 1e-4 + 0.01
    v2 = 0.99 * v1 + 0.01 * d2 * d2

    x2 = server_opt_step(x1, {"k": torch.tensor([1.0])}, state, kind="adam", **KW)

    assert x2["k"].item() == pytest.approx(x1["k"].item() + 0.1 * m2 / (math.sqrt(v2) + 0.01), rel=1e-5)


def test_fedopt_strategy_steps_from_current_and_checkpoints_its_state() -> None:
    strategy = FedOpt(plan=FedAvg(local_steps=1, lr=0.1), kind="yogi", **KW)
    updates = [ClientUpdate(cid, {"k": torch.tensor([value])}, 1, {}) for cid, value in [("a", 1.0), ("b", 3.0)]]

    out = strategy.aggregate(1, updates, [], {"k": torch.tensor([0.0])})
    saved = strategy.state_dict()
    again = FedOpt(plan=FedAvg(local_steps=1, lr=0.1), kind="yogi", **KW)
    again.load_state_dict(saved)

    assert 0 < out.tensors["k"].item() < 2.0  # moved towards the average 2, by a server step
    assert set(saved) == {"m/k", "v/k"} and torch.equal(again.state.m["k"], strategy.state.m["k"])
    assert strategy.name == "fedyogi" and FedOpt.linear is True
    with pytest.raises(ValueError, match="beta1"):
        FedOpt(plan=FedAvg(local_steps=1, lr=0.1), beta1=1.0)
