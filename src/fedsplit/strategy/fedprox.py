"""FedProx (Li et al., MLSys 2020) on the client parts of FL-GLM (arXiv 2406.14898).

Each client adds the proximal term ``mu/2 * ||w - w_global||^2`` over its trainable head/tail
parameters to its local loss, which keeps non-IID clients from drifting far from the global
client parts during their local steps. The server side is FedAvg; the strategy only sends ``mu``
to the clients in ``RoundPlan.settings[PROXIMAL_MU]``.

Client side: either add :func:`proximal_term` to the loss before ``backward``, or, in a loop that
does not own the loss (the split step computes it in the tail), call :func:`add_proximal_grad_`
once after the micro-batches' backward passes and before the optimizer step (and before the
global-norm clipping, so the clip sees the full gradient). Both give the gradient
``mu * (w - w_global)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedsplit.strategy.base import AggregateResult, ClientUpdate, Failure, RoundPlan, TooFewResults, check_finite_number
from fedsplit.strategy.fedavg import FedAvg

PROXIMAL_MU = "proximal_mu"  # RoundPlan.settings key: the client's proximal coefficient


def _pairs(params: Mapping[str, Tensor], global_tensors: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    missing = sorted(set(params) - set(global_tensors))
    if missing:
        raise KeyError(f"proximal term: expected a global tensor for every parameter, missing {missing[:3]}")
    pairs = []
    for key, param in params.items():
        anchor = global_tensors[key]
        if anchor.shape != param.shape:
            raise ValueError(f"proximal term: {key!r}: expected shape {tuple(param.shape)}, got {tuple(anchor.shape)}")
        pairs.append((param, anchor.detach().to(device=param.device, dtype=param.dtype)))
    return pairs


def proximal_term(params: Mapping[str, Tensor], global_tensors: Mapping[str, Tensor], mu: float) -> Tensor:
    """``mu/2 * sum_k ||params[k] - global[k]||^2`` (differentiable in ``params``; a 0-dim tensor)."""
    check_finite_number(mu, "mu")
    pairs = _pairs(params, global_tensors)
    if not pairs:
        return torch.zeros(())
    return (mu / 2) * sum(((param - anchor) ** 2).sum() for param, anchor in pairs)  # type: ignore[return-value]


@torch.no_grad()
def add_proximal_grad_(params: Mapping[str, Tensor], global_tensors: Mapping[str, Tensor], mu: float) -> None:
    """``param.grad += mu * (param - global)`` for every parameter: the gradient of :func:`proximal_term`."""
    check_finite_number(mu, "mu")
    for param, anchor in _pairs(params, global_tensors):
        step = mu * (param - anchor)
        param.grad = step.clone() if param.grad is None else param.grad.add_(step)


@dataclass(frozen=True, kw_only=True)
class FedProx:
    """FedAvg on the server (``plan``), with ``mu`` for the clients' proximal term in each plan."""

    plan: FedAvg
    mu: float = 0.01
    name: ClassVar[str] = "fedprox"
    linear: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_finite_number(self.mu, "mu")
        if self.mu < 0:
            raise ValueError(f"mu: expected >= 0, got {self.mu}")

    @property
    def min_clients(self) -> int:
        return self.plan.min_clients

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        plan = self.plan.configure_round(round, available)
        return RoundPlan(plan.round, plan.client_ids, {**plan.settings, PROXIMAL_MU: float(self.mu)})

    def aggregate(
        self,
        round: int,
        results: Sequence[ClientUpdate],
        failures: Sequence[Failure],
        current: Mapping[str, Tensor],
    ) -> AggregateResult | TooFewResults:
        return self.plan.aggregate(round, results, failures, current)
