"""Aggregation strategies for the client parts of FL-GLM (arXiv 2406.14898).

``base`` holds the interface and the data that crosses it, ``aggregate`` the pure math,
``fedavg`` the default strategy; ``dynamic`` the cross-cloud weights omega_k (arXiv 2503.12226),
``fedprox`` and ``fedopt`` (FedAdam/FedYogi/FedAdagrad), ``robust`` (median, trimmed mean, Krum);
``config`` the ``[strategy]`` section and ``build`` the factory and the aggregation-mode check.
"""

from __future__ import annotations

from fedsplit.strategy.aggregate import AggregationError, cap_shares, weighted_average
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
from fedsplit.strategy.build import (
    AGGREGATION_MODES,
    IncompatibleStrategyError,
    build_strategy,
    check_aggregation_mode,
    is_linear,
)
from fedsplit.strategy.config import STRATEGY_NAMES, StrategyConfig
from fedsplit.strategy.dynamic import BANDWIDTH_METRIC, DynamicWeight, dynamic_weights
from fedsplit.strategy.fedavg import FedAvg, weighted_metrics
from fedsplit.strategy.fedopt import FedOpt, server_opt_step
from fedsplit.strategy.fedprox import PROXIMAL_MU, FedProx, add_proximal_grad_, proximal_term
from fedsplit.strategy.robust import Krum, Median, TrimmedMean, coordinate_median, krum_select, multi_krum, trimmed_mean

__all__ = [
    "AGGREGATION_MODES",
    "BANDWIDTH_METRIC",
    "PROXIMAL_MU",
    "STRATEGY_NAMES",
    "DynamicWeight",
    "FedOpt",
    "FedProx",
    "IncompatibleStrategyError",
    "Krum",
    "Median",
    "StrategyConfig",
    "TrimmedMean",
    "add_proximal_grad_",
    "build_strategy",
    "cap_shares",
    "check_aggregation_mode",
    "coordinate_median",
    "dynamic_weights",
    "is_linear",
    "krum_select",
    "multi_krum",
    "proximal_term",
    "server_opt_step",
    "trimmed_mean",
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
