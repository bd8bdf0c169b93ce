"""Server optimisers over the client parts: FedAdam, FedYogi, FedAdagrad (Reddi et al., ICLR 2021).

"Adaptive Federated Optimization" (arXiv 2003.00295, Algorithm 2) treats the average client
change as a pseudo-gradient and applies an adaptive optimiser on the server. Here it runs on the
client parts of FL-GLM (arXiv 2406.14898), the head/tail adapters::

    delta = weighted_mean_k(w_k) - w              # the average client change
    m     = beta1 * m + (1 - beta1) * delta
    v     = v + delta^2                                          (adagrad)
    v     = v - (1 - beta2) * delta^2 * sign(v - delta^2)        (yogi)
    v     = beta2 * v + (1 - beta2) * delta^2                    (adam)
    w     = w + eta * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``); no bias
correction, as in the paper. The client average is linear, so the rule runs under secure
aggregation: the server needs only the sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fedsplit.strategy.aggregate import AggregationError, check_compatible, like
from fedsplit.strategy.base import AggregateResult, ClientUpdate, Failure, RoundPlan, TooFewResults, check_finite_number
from fedsplit.strategy.fedavg import FedAvg

SERVER_OPTIMIZERS = ("adam", "yogi", "adagrad")


@dataclass
class ServerOptState:
    """The server optimiser's moments per key (float64, CPU): ``m`` and ``v``."""

    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)


def server_opt_step(
    current: Mapping[str, Tensor],
    average: Mapping[str, Tensor],
    state: ServerOptState,
    *,
    kind: str,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> dict[str, Tensor]:
    """One server step from ``current`` towards the clients' ``average``; updates ``state`` in place."""
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"kind: expected one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
    check_compatible(current, average, "the clients' average")
    result = {}
    for key, reference in current.items():
        x = reference.detach().to(device="cpu", dtype=torch.float64)
        delta = average[key].detach().to(device="cpu", dtype=torch.float64) - x
        m = state.m.get(key, torch.zeros_like(x))
        v = state.v.get(key, torch.full_like(x, tau * tau))
        m = beta1 * m + (1 - beta1) * delta
        square = delta * delta
        if kind == "adagrad":
            v = v + square
        elif kind == "yogi":
            v = v - (1 - beta2) * square * torch.sign(v - square)
        else:
            v = beta2 * v + (1 - beta2) * square
        state.m[key], state.v[key] = m, v
        result[key] = like(x + eta * m / (v.sqrt() + tau), reference)
    return result


@dataclass(kw_only=True)
class FedOpt:
    """FedAvg's sampling and weighted average (``plan``), then a server optimiser step.

    Stateful: the moments live in ``state`` (``state_dict`` / ``load_state_dict`` for checkpoints).
    """

    plan: FedAvg
    kind: str = "adam"  # adam | yogi | adagrad
    eta: float = 1e-2  # server learning rate
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: larger is closer to plain SGD on the pseudo-gradient
    state: ServerOptState = field(default_factory=ServerOptState)
    linear: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"kind: expected one of {', '.join(SERVER_OPTIMIZERS)}, got {self.kind!r}")
        check_finite_number(self.eta, "eta", positive=True)
        check_finite_number(self.tau, "tau", positive=True)
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            check_finite_number(value, key)
            if not 0 <= value < 1:
                raise ValueError(f"{key}: expected a value in [0, 1), got {value}")

    @property
    def name(self) -> str:
        return f"fed{self.kind}"

    @property
    def min_clients(self) -> int:
        return self.plan.min_clients

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        return self.plan.configure_round(round, available)

    def aggregate(
        self,
        round: int,
        results: Sequence[ClientUpdate],
        failures: Sequence[Failure],
        current: Mapping[str, Tensor],
    ) -> AggregateResult | TooFewResults:
        if not current:
            raise AggregationError(f"{self.name}: expected the current global client parts, got none")
        averaged = self.plan.aggregate(round, results, failures, current)
        if isinstance(averaged, TooFewResults):
            return averaged
        tensors = server_opt_step(
            current, averaged.tensors, self.state,
            kind=self.kind, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
        )  # fmt: skip
        return AggregateResult(tensors, averaged.metrics, averaged.num_examples, averaged.clients)

    def state_dict(self) -> dict[str, Tensor]:
        """The moments as flat tensors (``m/<key>``, ``v/<key>``), e.g. for a safetensors checkpoint."""
        return {**{f"m/{k}": t for k, t in self.state.m.items()}, **{f"v/{k}": t for k, t in self.state.v.items()}}

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        stray = sorted(k for k in tensors if not k.startswith(("m/", "v/")))
        if stray:
            raise ValueError(f"{self.name} state: expected keys 'm/...' or 'v/...', got {stray[:3]}")
        self.state = ServerOptState(
            m={k[2:]: t.to(torch.float64) for k, t in tensors.items() if k.startswith("m/")},
            v={k[2:]: t.to(torch.float64) for k, t in tensors.items() if k.startswith("v/")},
        )
