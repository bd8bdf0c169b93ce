"""FedProx through the coordinator and the client runner: mu = 0 is FedAvg bit for bit, mu > 0 pulls
the client parts toward the round's global parts."""

from __future__ import annotations

import torch

from fedsplit.strategy import FedAvg, FedProx
from fedsplit.train.config import TrainConfig

from .federation import make_federation

CFG = TrainConfig(lr=1e-2, seed=0)


def _run(strategy) -> tuple[dict, dict]:
    """One client, one round of 4 local steps through the real coordinator; (initial, final) client parts."""
    fed = make_federation(["a"], num_rounds=1, local_steps=4, cfg=CFG)
    fed.coordinator.strategy = strategy
    initial = fed.coordinator.global_adapters
    return initial, fed.run().global_adapters


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def test_fedprox_with_mu_zero_is_fedavg_bitwise_and_mu_pulls_toward_the_global_parts():
    # Arrange
    fedavg = FedAvg(local_steps=4, lr=CFG.lr)

    # Act
    initial, plain = _run(fedavg)
    _, zero = _run(FedProx(plan=fedavg, mu=0.0))
    _, pulled = _run(FedProx(plan=fedavg, mu=100.0))

    # Assert
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    moved, held = _distance(plain, initial), _distance(pulled, initial)
    assert moved > 0 and held < 0.9 * moved, (moved, held)
