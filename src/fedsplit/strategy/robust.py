"""Byzantine-robust aggregation of the client parts: coordinate-wise median, trimmed mean, Krum.

Cross-cloud federation (arXiv 2503.12226) joins parties that do not trust each other; one bad
party must not be able to steer the shared head/tail adapters. These rules replace the weighted
mean of FedAvg:

- coordinate-wise median and trimmed mean (Yin et al., ICML 2018): per coordinate, the median of
  the clients' values, or the mean after dropping the ``floor(beta * n)`` largest and smallest;
- Krum / multi-Krum (Blanchard et al., NeurIPS 2017): score each update by the summed squared
  distance to its ``n - f - 2`` nearest neighbours (``f``: assumed Byzantine clients), keep the
  ``m`` lowest scores and average them (``m = 1`` is Krum).

They are non-linear in the updates, so they need each update in the clear: ``linear = False``
(:func:`fedsplit.strategy.build.check_aggregation_mode` refuses them under secure or homomorphic
aggregation). Every update counts once, whatever its number of examples: weighting by a number
the client reports would hand a Byzantine client the weight it asks for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fedsplit.strategy.aggregate import AggregationError, check_states, like, stacked
from fedsplit.strategy.base import AggregateResult, ClientUpdate, Failure, RoundPlan, TooFewResults
from fedsplit.strategy.fedavg import FedAvg, ordered_results, weighted_metrics


# -- pure rules over state dicts --------------------------------------------------------------
def coordinate_median(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per coordinate, the median of the states' values (the mean of the two middle ones for even n)."""
    check_states(states)
    result = {}
    for key, reference in states[0].items():
        values = stacked(states, key).sort(dim=0).values  # (n, ...)
        n = values.shape[0]
        median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        result[key] = like(median, reference)
    return result


def trimmed_mean(states: Sequence[Mapping[str, Tensor]], beta: float) -> dict[str, Tensor]:
    """Per coordinate, the mean after dropping the ``floor(beta * n)`` largest and smallest values."""
    if not 0 <= beta < 0.5:
        raise AggregationError(f"beta: expected a value in [0, 0.5), got {beta}")
    check_states(states)
    n = len(states)
    trim = math.floor(beta * n + 1e-9)
    result = {}
    for key, reference in states[0].items():
        values = stacked(states, key).sort(dim=0).values  # (n, ...)
        result[key] = like(values[trim : n - trim].mean(dim=0), reference)
    return result


def krum_scores(states: Sequence[Mapping[str, Tensor]], byzantine: int) -> list[float]:
    """Each state's Krum score: summed squared distance to its ``n - f - 2`` nearest other states."""
    n = len(states)
    check_states(states)
    neighbours = n - byzantine - 2
    if byzantine < 0 or neighbours < 1:
        raise AggregationError(f"Krum: expected n >= f + 3 updates (n - f - 2 >= 1), got {n=}, f={byzantine}")
    flat = torch.stack([torch.cat([stacked([s], k).flatten() for k in sorted(s)]) for s in states])  # (n, P)
    distances = torch.cdist(flat, flat).pow(2)  # (n, n)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum_select(states: Sequence[Mapping[str, Tensor]], byzantine: int, selected: int = 1) -> list[int]:
    """Indices of the ``selected`` states with the lowest Krum scores (ties: lower index first)."""
    if not 1 <= selected <= len(states):
        raise AggregationError(f"Krum: expected 1 <= m <= {len(states)} selected updates, got {selected}")
    scores = krum_scores(states, byzantine)
    return sorted(sorted(range(len(states)), key=lambda i: (scores[i], i))[:selected])


def multi_krum(states: Sequence[Mapping[str, Tensor]], byzantine: int, selected: int = 1) -> dict[str, Tensor]:
    """The plain mean of the ``selected`` states :func:`krum_select` keeps (``selected=1``: Krum)."""
    return mean_of([states[i] for i in krum_select(states, byzantine, selected)])


def mean_of(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The unweighted mean of the states, per key."""
    return {key: like(stacked(states, key).mean(dim=0), ref) for key, ref in states[0].items()}


# -- strategies -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Robust:
    """Sampling as FedAvg (``plan``); aggregation by a robust rule over the updates sorted by id."""

    plan: FedAvg  # picks the clients and their settings (its weight_fn is not used)
    linear: ClassVar[bool] = False
    name: ClassVar[str] = ""
    min_results: int = field(default=1, init=False)  # the rule's own minimum, on top of plan.min_clients

    @property
    def min_clients(self) -> int:
        return max(self.plan.min_clients, self.min_results)

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        return self.plan.configure_round(round, available)

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
        tensors, kept = self.rule([update.tensors for update in ordered])
        weights = [1.0 if index in kept else 0.0 for index in range(len(ordered))]
        metrics = weighted_metrics(ordered, weights)
        metrics.update(num_results=len(ordered), num_failures=len(failures), num_kept=len(kept))
        total = sum(update.num_examples for update in ordered)
        clients = [update.client_id for update in ordered]
        return AggregateResult(tensors=tensors, metrics=metrics, num_examples=total, clients=clients)

    def rule(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
        """The aggregate and the indices of the states it kept (their metrics are reported)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Median(_Robust):
    """Coordinate-wise median of the client parts."""

    name: ClassVar[str] = "median"

    def rule(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
        return coordinate_median(states), list(range(len(states)))


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(_Robust):
    """Coordinate-wise mean after trimming ``floor(beta * n)`` values at each end."""

    name: ClassVar[str] = "trimmed-mean"
    beta: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < 0.5:
            raise ValueError(f"beta: expected a value in [0, 0.5), got {self.beta!r}")

    def rule(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
        return trimmed_mean(states, self.beta), list(range(len(states)))


@dataclass(frozen=True, kw_only=True)
class Krum(_Robust):
    """Krum (``selected = 1``) or multi-Krum: the mean of the ``selected`` most central updates."""

    name: ClassVar[str] = "krum"
    byzantine: int = 0  # f: Byzantine clients tolerated; needs n >= f + 3 results
    selected: int = 1  # m: updates averaged; 0: n - f

    def __post_init__(self) -> None:
        for key in ("byzantine", "selected"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}: expected an int >= 0, got {value!r}")
        object.__setattr__(self, "min_results", max(self.byzantine + 3, self.selected))

    def rule(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], list[int]]:
        picked = krum_select(states, self.byzantine, self.selected or len(states) - self.byzantine)
        return mean_of([states[i] for i in picked]), picked
