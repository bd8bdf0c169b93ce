from __future__ import annotations

import pytest
import torch

from fedsplit.strategy import PROXIMAL_MU, FedAvg, FedProx, add_proximal_grad_, proximal_term


def test_proximal_term_by_hand_and_its_gradient() -> None:
    # mu/2 * ((1-0)^2 + (3-1)^2 + (-1-(-1))^2) = 0.5/2 * 5 = 1.25
    w = {"a": torch.tensor([1.0, 3.0], requires_grad=True), "b": torch.tensor([-1.0], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}

    term = proximal_term(w, anchor, 0.5)
    term.backward()

    assert term.item() == pytest.approx(1.25)
    assert w["a"].grad.tolist() == [0.5, 1.0] and w["b"].grad.tolist() == [0.0]


def test_add_proximal_grad_equals_the_terms_gradient() -> None:
    w = {"a": torch.tensor([1.0, 3.0], requires_grad=True)}
    w["a"].grad = torch.tensor([10.0, 10.0])  # the task loss's gradient is already there

    add_proximal_grad_(w, {"a": torch.tensor([0.0, 1.0])}, 0.5)

    assert w["a"].grad.tolist() == [10.5, 11.0]


def test_proximal_term_needs_every_global_tensor() -> None:
    with pytest.raises(KeyError, match="missing"):
        proximal_term({"a": torch.zeros(1)}, {}, 0.1)


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    strategy = FedProx(plan=FedAvg(local_steps=2, lr=0.1), mu=0.05)

    plan = strategy.configure_round(1, ["b", "a"])

    assert plan.settings == {"local_steps": 2, "lr": 0.1, PROXIMAL_MU: 0.05}
    assert plan.client_ids == ["a", "b"] and FedProx.linear is True
    with pytest.raises(ValueError, match="mu"):
        FedProx(plan=FedAvg(local_steps=1, lr=0.1), mu=-1.0)
