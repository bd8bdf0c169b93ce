"""Synchronous, semi-synchronous and asynchronous rounds (``[federation] round_mode``), as coordinator settings.

Cross-cloud training (arXiv 2503.12226) must not let one slow cloud stall every round. The
coordinator already ends a round at its deadline (``round_timeout_s``): the participants that have
not sent their update fail ("round timeout", their partial trunk step discarded, readmitted at the
next round) and the round aggregates the updates that arrived, if at least ``min_clients`` did.

    sync       the deadline is server.round_timeout_s (an hour by default: a safety net), and in
               sequential mode the participants take their trunk steps in round-robin turn
               (reproducible: a run with fixed seeds is deterministic and resumable exactly).
    semi_sync  the deadline is federation.round_deadline_s, and turns are off: a fast client takes
               its next step as soon as the trunk is free instead of waiting for a slow client's turn,
               so it can finish before the deadline. Which updates arrive in time depends on timing,
               so the run is no longer reproducible bit for bit.
    async      FedBuff (arXiv 2106.06639; :mod:`fedsplit.server.async_rounds`): no lobby and no round
               barrier. A client trains from the current global parts, sends its update and at once
               gets the then-current parts; every ``buffer_size`` distinct clients' updates are one
               aggregation (one round): g += server_lr * sum_c p_c mean_k (1 + tau_k)^-staleness_exponent
               (x_k - g_{v_k}), p_c the clients' capped FedAvg shares (:mod:`fedsplit.server.buffered`).
               Updates staler than ``max_staleness`` rounds are refused. Only FedAvg-weighted strategies
               (fedavg, fedprox, dynamic), plain aggregation without DP noise, sequential server mode and
               ``fraction = 1`` (:func:`check_async`). A run fails when no round is aggregated for
               server.round_timeout_s. Not reproducible bit for bit (what lands in which buffer is timing).

A client still holds the trunk's lease from its FORWARD to its OPTIMIZER_STEP, so the round trips of
a client behind a slow link inside one step keep the trunk idle for the others (see docs/cross_cloud.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsplit.config import RunConfig


@dataclass(frozen=True)
class RoundTiming:
    round_timeout_s: float  # a round aggregates what arrived this long after it started
    ordered_steps: bool  # round-robin trunk turns (sequential mode, sync rounds)


def round_timing(cfg: RunConfig) -> RoundTiming:
    sequential = cfg.server.mode == "sequential"
    if cfg.federation.round_mode == "sync":
        return RoundTiming(cfg.server.round_timeout_s, ordered_steps=sequential)
    if cfg.federation.round_mode == "async":  # the longest wait for the next aggregation
        return RoundTiming(cfg.server.round_timeout_s, ordered_steps=False)
    return RoundTiming(cfg.federation.round_deadline_s or cfg.server.round_timeout_s, ordered_steps=False)


def check_async(cfg: RunConfig, num_clients: int) -> None:
    """Refuse a configuration that ``round_mode = "async"`` cannot run, saying why (ValueError)."""
    from fedsplit.server.buffered import ASYNC_STRATEGIES

    fed = cfg.federation
    if fed.round_mode != "async":
        return
    why = []
    if cfg.strategy.name not in ASYNC_STRATEGIES:
        why.append(f"strategy.name = {cfg.strategy.name!r}: the buffered rule is a FedAvg-weighted sum of deltas; "
                   f"expected one of {', '.join(ASYNC_STRATEGIES)}")
    if cfg.aggregation.mode != "plain" or cfg.aggregation.dp_noise != "none":
        why.append(f"aggregation.mode = {cfg.aggregation.mode!r}, dp_noise = {cfg.aggregation.dp_noise!r}: secure, "
                   "homomorphic and DP aggregation run per synchronous round; expected mode = 'plain', dp_noise = "
                   "'none'")
    if cfg.server.mode != "sequential":
        why.append(f"server.mode = {cfg.server.mode!r}: client-batching and sub-servers step clients in "
                   "lockstep; expected 'sequential'")
    if fed.fraction != 1.0:
        why.append(f"federation.fraction = {fed.fraction}: every client trains all the time; expected 1")
    if not 2 <= fed.buffer_size <= num_clients:
        why.append(f"federation.buffer_size = {fed.buffer_size}: expected 2..{num_clients} (the clients)")
    if fed.min_clients > fed.buffer_size:
        why.append(f"federation.min_clients = {fed.min_clients}: a round aggregates buffer_size clients; "
                   f"expected <= {fed.buffer_size}")
    if why:
        raise ValueError("federation.round_mode = 'async' cannot run this configuration: " + "; ".join(why))


def make_coordinator(cfg: RunConfig, trunk: Any, strategy: Any, global_adapters: Any, clients: Any,
                     coordinator_cfg: Any, **kwargs: Any) -> Any:
    """The round driver ``round_mode`` names: a RoundCoordinator, or an AsyncCoordinator for "async"."""
    if cfg.federation.round_mode != "async":
        from fedsplit.server.coordinator import RoundCoordinator

        return RoundCoordinator(trunk, strategy, global_adapters, clients, coordinator_cfg, **kwargs)
    from fedsplit.server.async_rounds import AsyncCoordinator
    from fedsplit.server.buffered import AsyncSettings

    check_async(cfg, len(clients))
    fed = cfg.federation
    settings = AsyncSettings(buffer_size=fed.buffer_size, staleness_exponent=fed.staleness_exponent,
                             max_staleness=fed.max_staleness, server_lr=fed.server_lr)
    return AsyncCoordinator(trunk, strategy, global_adapters, clients, coordinator_cfg, settings=settings, **kwargs)
