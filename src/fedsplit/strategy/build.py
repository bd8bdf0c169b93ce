"""Config in, ``Strategy`` out; and the check that a strategy fits the aggregation mode.

Non-linear rules (median, trimmed mean, Krum) need every update in the clear. Under secure
aggregation (pairwise masks), homomorphic encryption (CKKS) or the hybrid of both, the server only
ever sees the *sum* of the updates, so only linear rules (weighted sums, and server optimisers
applied to that sum) can run: :func:`check_aggregation_mode` refuses the rest before a round starts.
"""

from __future__ import annotations

from fedsplit.strategy.base import Strategy
from fedsplit.strategy.config import STRATEGY_NAMES, StrategyConfig
from fedsplit.strategy.dynamic import DynamicWeight
from fedsplit.strategy.fedavg import FedAvg
from fedsplit.strategy.fedopt import FedOpt
from fedsplit.strategy.fedprox import FedProx
from fedsplit.strategy.robust import Krum, Median, TrimmedMean

AGGREGATION_MODES = ("plain", "secagg", "ckks", "hybrid")
LINEAR_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "dynamic")


class IncompatibleStrategyError(ValueError):
    """The strategy cannot run under the configured aggregation mode."""


def build_strategy(
    cfg: StrategyConfig,
    *,
    local_steps: int,
    lr: float,
    min_clients: int = 1,
    fraction: float = 1.0,
    seed: int = 0,
) -> Strategy:
    """The strategy ``cfg.name`` names; the federation's numbers set its sampling and client settings."""
    weight_fn = DynamicWeight(cfg.alpha, cfg.loss_term) if cfg.name == "dynamic" else None
    plan = FedAvg(
        local_steps=local_steps, lr=lr, min_clients=min_clients, fraction=fraction, seed=seed, max_share=cfg.max_share,
        **({"weight_fn": weight_fn} if weight_fn is not None else {}),
    )  # fmt: skip
    if cfg.name in ("fedavg", "dynamic"):
        return plan
    if cfg.name == "fedprox":
        return FedProx(plan=plan, mu=cfg.mu)
    if cfg.name in ("fedadam", "fedyogi", "fedadagrad"):
        kind = cfg.name.removeprefix("fed")
        return FedOpt(plan=plan, kind=kind, eta=cfg.eta, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    if cfg.name == "median":
        return Median(plan=plan)
    if cfg.name == "trimmed-mean":
        return TrimmedMean(plan=plan, beta=cfg.trim_beta)
    if cfg.name == "krum":
        return Krum(plan=plan, byzantine=cfg.byzantine, selected=1)
    if cfg.name == "multi-krum":
        return Krum(plan=plan, byzantine=cfg.byzantine, selected=cfg.selected)
    raise ValueError(f"strategy.name: expected one of {', '.join(STRATEGY_NAMES)}, got {cfg.name!r}")


def is_linear(strategy: Strategy | str) -> bool:
    """Whether the rule is a (weighted) sum of the updates: by name, or the strategy's ``linear``."""
    if isinstance(strategy, str):
        if strategy not in STRATEGY_NAMES:
            raise ValueError(f"strategy: expected one of {', '.join(STRATEGY_NAMES)}, got {strategy!r}")
        return strategy in LINEAR_STRATEGIES
    return bool(getattr(strategy, "linear", False))  # a strategy that does not say is not assumed linear


def check_aggregation_mode(strategy: Strategy | str, mode: str) -> None:
    """Raise :class:`IncompatibleStrategyError` if ``strategy`` cannot run under ``mode``."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation mode: expected one of {', '.join(AGGREGATION_MODES)}, got {mode!r}")
    if mode == "plain" or is_linear(strategy):
        return
    name = strategy if isinstance(strategy, str) else getattr(strategy, "name", "") or type(strategy).__name__
    raise IncompatibleStrategyError(
        f"strategy {name!r} is non-linear (it needs every client's update in the clear) and cannot run under "
        f"aggregation mode {mode!r}, where the server only sees the sum of the updates; use mode 'plain', "
        f"or a linear strategy: {', '.join(LINEAR_STRATEGIES)}"
    )
