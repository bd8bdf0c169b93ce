"""Federated averaging of the client parts (head and tail adapters), as FL-GLM (arXiv 2406.14898)
aggregates them after every round; the averaging itself is McMahan et al. (2017), FedAvg.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from fedsplit.strategy.aggregate import cap_shares, check_compatible, weighted_average
from fedsplit.strategy.base import (
    AggregateResult,
    ClientUpdate,
    Failure,
    NotEnoughClientsError,
    RoundPlan,
    TooFewResults,
    WeightFn,
    check_finite_number,
    check_round,
    num_examples,
)


@dataclass(frozen=True, kw_only=True)
class FedAvg:
    """Sample a fraction of the clients each round; average their updates by ``weight_fn``.

    Sampling depends only on ``seed``, ``round`` and the set of available ids (not their order),
    so a rerun picks the same clients. Updates are sorted by client id before averaging, so the
    aggregate is bit-identical whatever order the results arrived in. ``max_share`` < 1 caps any
    client's share of the average (:func:`~fedsplit.strategy.aggregate.cap_shares`).
    """

    name: ClassVar[str] = "fedavg"
    linear: ClassVar[bool] = True  # a weighted sum: runs under secure / homomorphic aggregation

    local_steps: int  # optimizer steps each client runs per round
    lr: float  # client learning rate
    min_clients: int = 1  # fewer results than this fail the round
    fraction: float = 1.0  # share of the available clients sampled per round, in (0, 1]
    seed: int = 0
    weight_fn: WeightFn = num_examples
    max_share: float = 1.0  # largest share of the average any one client may hold, in (0, 1]

    def __post_init__(self) -> None:
        _check_positive_int(self.local_steps, "local_steps")
        _check_positive_int(self.min_clients, "min_clients")
        check_finite_number(self.lr, "lr", positive=True)
        check_finite_number(self.fraction, "fraction", positive=True)
        if self.fraction > 1:
            raise ValueError(f"fraction: expected a value in (0, 1], got {self.fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        check_finite_number(self.max_share, "max_share", positive=True)
        if self.max_share > 1:
            raise ValueError(f"max_share: expected a value in (0, 1], got {self.max_share}")
        if not callable(self.weight_fn):
            raise TypeError(f"weight_fn: expected a callable, got {type(self.weight_fn).__name__}")

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        check_round(round)
        ids = sorted(available)  # sampling must not depend on the order clients connected in
        if len(set(ids)) != len(ids):
            raise ValueError(f"available: expected unique client ids, got {list(available)}")
        if len(ids) < self.min_clients:
            raise NotEnoughClientsError(
                f"round {round}: expected at least {self.min_clients} available clients, "
                f"got {len(ids)}"
            )
        rng = np.random.default_rng([self.seed, round])
        picked = rng.choice(len(ids), size=self.sample_size(len(ids)), replace=False)
        settings: dict[str, float | int | str] = {"local_steps": self.local_steps, "lr": self.lr}
        client_ids = [ids[i] for i in sorted(picked)]
        return RoundPlan(round=round, client_ids=client_ids, settings=settings)

    def sample_size(self, num_available: int) -> int:
        """``ceil(fraction * num_available)``, clipped to ``[min_clients, num_available]``."""
        wanted = math.ceil(round(self.fraction * num_available, 9))  # 0.3 * 10 must give 3, not 4
        return min(num_available, max(self.min_clients, wanted))

    def aggregate(
        self,
        round: int,
        results: Sequence[ClientUpdate],
        failures: Sequence[Failure],
        current: Mapping[str, Tensor],
    ) -> AggregateResult | TooFewResults:
        ordered = ordered_results(round, results, failures, current, self.min_clients)
        if isinstance(ordered, TooFewResults):
            return ordered
        ids = [update.client_id for update in ordered]
        weights = [self.weight_fn(update) for update in ordered]
        if self.max_share < 1:
            weights = cap_shares(weights, self.max_share)
        tensors = weighted_average([(u.tensors, w) for u, w in zip(ordered, weights, strict=False)], labels=ids)
        metrics = weighted_metrics(ordered, weights)
        metrics.update(num_results=len(ordered), num_failures=len(failures))
        total = sum(update.num_examples for update in ordered)
        return AggregateResult(tensors=tensors, metrics=metrics, num_examples=total, clients=ids)


def ordered_results(
    round: int,
    results: Sequence[ClientUpdate],
    failures: Sequence[Failure],
    current: Mapping[str, Tensor],
    min_clients: int,
) -> list[ClientUpdate] | TooFewResults:
    """``results`` sorted by client id, checked: one per client, ``current``'s keys; or too few of them."""
    check_round(round)
    ordered = sorted(results, key=lambda update: update.client_id)
    ids = [update.client_id for update in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"round {round}: expected one result per client, got {ids}")
    if len(ordered) < min_clients:
        return TooFewResults(round, min_clients, ids, list(failures))
    if current:  # the clients must have trained the parts the server holds
        for update in ordered:
            check_compatible(current, update.tensors, f"client {update.client_id!r}", against="global client parts")
    return ordered


def weighted_metrics(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, float]:
    """Per metric name, the weighted mean over the updates that report it (weights as aggregated).

    A metric whose reporters all have weight 0 is left out.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for update, weight in zip(updates, weights, strict=False):
        if weight == 0:  # dropped from the aggregate: its metrics (maybe NaN) must not count
            continue
        for name, value in update.metrics.items():
            sums[name] = sums.get(name, 0.0) + weight * float(value)
            totals[name] = totals.get(name, 0.0) + weight
    return {name: sums[name] / totals[name] for name in sums}


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
