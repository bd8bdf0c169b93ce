"""Aggregation strategies for the client parts of FL-GLM (arXiv 2406.14898).

``base`` holds the interface and the data that crosses it, ``aggregate`` the pure math,
``fedavg`` the default strategy.
"""

from __future__ import annotations

from fedsplit.strategy.aggregate import AggregationError, weighted_average
from fedsplit.strategy.base import (
    AggregateResult,
    ClientUpdate,
    Failure,
    NotEnoughClientsError,
    NotEnoughResultsError,
    RoundPlan,
    Strategy,
    StrategyError,
    WeightFn,
    num_examples,
)
from fedsplit.strategy.fedavg import FedAvg, weighted_metrics

__all__ = [
    "AggregateResult",
    "AggregationError",
    "ClientUpdate",
    "Failure",
    "FedAvg",
    "NotEnoughClientsError",
    "NotEnoughResultsError",
    "RoundPlan",
    "Strategy",
    "StrategyError",
    "WeightFn",
    "num_examples",
    "weighted_average",
    "weighted_metrics",
]
