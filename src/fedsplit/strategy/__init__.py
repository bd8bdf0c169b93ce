"""Aggregation strategies for the client parts of FL-GLM (arXiv 2406.14898).

``base`` holds the interface and the data that crosses it, ``aggregate`` the pure math,
``fedavg`` the default strategy; ``dynamic`` the cross-cloud weights omega_k (arXiv 2503.12226),
``fedprox`` and ``fedopt`` (FedAdam/FedYogi/FedAdagrad), ``robust`` (median, trimmed mean, Krum);
``config`` the ``[strategy]`` section and ``build`` the factory and the aggregation-mode check.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsplit.strategy.aggregate import AggregationError, cap_shares, weighted_average
    from fedsplit.strategy.base import (
        AggregateResult,
        ClientUpdate,
        Failure,
        NotEnoughClientsError,
        RoundPlan,
        Strategy,
        StrategyError,
        TooFewResults,
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
    from fedsplit.strategy.robust import (
        Krum,
        Median,
        TrimmedMean,
        coordinate_median,
        krum_select,
        multi_krum,
        trimmed_mean,
    )

# Names are imported on first use: reading a [strategy] config must not import torch.
_HOMES = {
    "AGGREGATION_MODES": "fedsplit.strategy.build",
    "AggregateResult": "fedsplit.strategy.base",
    "AggregationError": "fedsplit.strategy.aggregate",
    "BANDWIDTH_METRIC": "fedsplit.strategy.dynamic",
    "ClientUpdate": "fedsplit.strategy.base",
    "DynamicWeight": "fedsplit.strategy.dynamic",
    "Failure": "fedsplit.strategy.base",
    "FedAvg": "fedsplit.strategy.fedavg",
    "FedOpt": "fedsplit.strategy.fedopt",
    "FedProx": "fedsplit.strategy.fedprox",
    "IncompatibleStrategyError": "fedsplit.strategy.build",
    "Krum": "fedsplit.strategy.robust",
    "Median": "fedsplit.strategy.robust",
    "NotEnoughClientsError": "fedsplit.strategy.base",
    "TooFewResults": "fedsplit.strategy.base",
    "PROXIMAL_MU": "fedsplit.strategy.fedprox",
    "RoundPlan": "fedsplit.strategy.base",
    "STRATEGY_NAMES": "fedsplit.strategy.config",
    "Strategy": "fedsplit.strategy.base",
    "StrategyConfig": "fedsplit.strategy.config",
    "StrategyError": "fedsplit.strategy.base",
    "TrimmedMean": "fedsplit.strategy.robust",
    "WeightFn": "fedsplit.strategy.base",
    "add_proximal_grad_": "fedsplit.strategy.fedprox",
    "build_strategy": "fedsplit.strategy.build",
    "cap_shares": "fedsplit.strategy.aggregate",
    "check_aggregation_mode": "fedsplit.strategy.build",
    "coordinate_median": "fedsplit.strategy.robust",
    "dynamic_weights": "fedsplit.strategy.dynamic",
    "is_linear": "fedsplit.strategy.build",
    "krum_select": "fedsplit.strategy.robust",
    "multi_krum": "fedsplit.strategy.robust",
    "num_examples": "fedsplit.strategy.base",
    "proximal_term": "fedsplit.strategy.fedprox",
    "server_opt_step": "fedsplit.strategy.fedopt",
    "trimmed_mean": "fedsplit.strategy.robust",
    "weighted_average": "fedsplit.strategy.aggregate",
    "weighted_metrics": "fedsplit.strategy.fedavg",
}

__all__ = [
    "AGGREGATION_MODES",
    "AggregateResult",
    "AggregationError",
    "BANDWIDTH_METRIC",
    "ClientUpdate",
    "DynamicWeight",
    "Failure",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "IncompatibleStrategyError",
    "Krum",
    "Median",
    "NotEnoughClientsError",
    "TooFewResults",
    "PROXIMAL_MU",
    "RoundPlan",
    "STRATEGY_NAMES",
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "TrimmedMean",
    "WeightFn",
    "add_proximal_grad_",
    "build_strategy",
    "cap_shares",
    "check_aggregation_mode",
    "coordinate_median",
    "dynamic_weights",
    "is_linear",
    "krum_select",
    "multi_krum",
    "num_examples",
    "proximal_term",
    "server_opt_step",
    "trimmed_mean",
    "weighted_average",
    "weighted_metrics",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fedsplit.strategy' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
