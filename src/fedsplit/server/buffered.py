"""Buffered asynchronous aggregation of the client parts: FedBuff (Nguyen et al. 2022, arXiv 2106.06639).

In ``[federation] round_mode = "async"`` no client waits for another: each one fetches the current
global client parts ``g_v`` (version ``v`` = aggregations done so far), trains, sends its parts
``x_k`` and fetches the then-current parts again. The server keeps what arrives in a buffer; once
updates of ``buffer_size`` distinct clients are in it, it applies one aggregation (one "round")::

    delta_k   = x_k - g_{v_k}                      what client k's training moved (float64)
    tau_k     = v - v_k                            staleness: aggregations since k fetched its parts
    s(tau)    = (1 + tau) ^ -staleness_exponent    FedBuff's 1 / sqrt(1 + tau) at exponent 0.5
    D_c       = mean over client c's buffered updates of s(tau_k) delta_k
    p_c       = cap_shares(w_c, max_share)         w_c: c's weight (data report through the strategy's
                                                   weight_fn), shares sum to 1, none above max_share
    g_{v+1}   = g_v + server_lr * sum_c p_c D_c

A buffer counts clients, not updates: a client that sends twice before the buffer is full is one
entry (the mean of its discounted deltas), so one fast client cannot fill a buffer on its own nor hold
more than its capped share. With fresh updates only (every ``tau = 0``) and ``server_lr = 1`` an
aggregation is exactly FedAvg's weighted mean of the clients' parts (up to float64 rounding, as the
deltas are summed instead of the parts). An update older than ``max_staleness`` aggregations is
refused by the caller (:func:`stale_reason`).

The functions here are pure (tensors and numbers in, tensors out; tested with tiny tensors); the
buffer only folds arriving updates into per-client float64 sums, so its memory is one copy of the
parts per client whatever the number of updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedsplit.strategy.aggregate import AggregationError, cap_shares, check_compatible, check_finite
from fedsplit.strategy.base import Strategy
from fedsplit.strategy.fedavg import FedAvg
from fedsplit.strategy.fedprox import FedProx

ASYNC_STRATEGIES = ("fedavg", "fedprox", "dynamic")  # FedAvg weights: the rule above is a weighted sum


@dataclass(frozen=True)
class AsyncSettings:
    """How the buffered aggregation runs (``[federation]`` buffer_size, staleness_exponent, ...); the
    weights and their cap (``max_share``) are the strategy's (:func:`fedavg_plan`)."""

    buffer_size: int = 2  # distinct clients per aggregation (FedBuff's K)
    staleness_exponent: float = 0.5  # s(tau) = (1 + tau) ** -exponent
    max_staleness: int = 16  # older updates are refused
    server_lr: float = 1.0  # eta_g of FedBuff

    def __post_init__(self) -> None:
        for name, least in (("buffer_size", 1), ("max_staleness", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"async.{name}: expected an int >= {least}, got {value!r}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"async.staleness_exponent: expected a finite value >= 0, got {self.staleness_exponent!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"async.server_lr: expected a finite value > 0, got {self.server_lr!r}")


def fedavg_plan(strategy: Strategy) -> FedAvg:
    """The FedAvg whose weights the buffered rule uses: the strategy itself, or FedProx's ``plan``.

    Anything else (robust rules, server optimisers, secure/homomorphic wrappers) is not a weighted
    sum of deltas the buffer can apply, and is refused with :class:`ValueError`.
    """
    plan = strategy if isinstance(strategy, FedAvg) else strategy.plan if isinstance(strategy, FedProx) else None
    if plan is None:
        name = getattr(strategy, "name", "") or type(strategy).__name__
        raise ValueError(f"round_mode 'async' aggregates with FedBuff's weighted sum of deltas; expected a strategy "
                         f"among {', '.join(ASYNC_STRATEGIES)}, got {name!r}")
    return plan


def staleness_discount(staleness: int, exponent: float) -> float:
    """FedBuff's ``s(tau) = (1 + tau) ** -exponent`` (1 for a fresh update)."""
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"staleness: expected an int >= 0, got {staleness!r}")
    return float((1.0 + staleness) ** -exponent)


def stale_reason(staleness: int, max_staleness: int) -> str | None:
    """Why an update trained on parts ``staleness`` aggregations old is refused (None: it is not)."""
    if staleness <= max_staleness:
        return None
    return (f"stale: trained on global parts {staleness} aggregations old, more than max_staleness = {max_staleness}; "
            f"fetch the current parts")


@dataclass
class BufferEntry:
    """One client's updates in the buffer: the sum of their discounted deltas, in float64."""

    client_id: str
    weight: float  # the mean of its updates' weights
    discounted: dict[str, Tensor]  # sum_k s(tau_k) delta_k, float64
    count: int = 1
    staleness: list[int] = field(default_factory=list)
    num_examples: int = 0  # summed over its updates (data-report weights)
    metrics: dict[str, float] = field(default_factory=dict)  # of its last update

    def mean_delta(self, key: str) -> Tensor:
        return self.discounted[key] / self.count


def discounted_delta(tensors: Mapping[str, Tensor], base: Mapping[str, Tensor], discount: float) -> dict[str, Tensor]:
    """``discount * (tensors - base)`` per key, in float64 on the CPU."""
    return {key: (tensors[key].detach().to("cpu", torch.float64) - base[key].detach().to("cpu", torch.float64))
            * discount for key in base}


def fedbuff_step(
    current: Mapping[str, Tensor], entries: Sequence[BufferEntry], *, server_lr: float, max_share: float,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``g + server_lr * sum_c p_c D_c`` (module docstring) and the shares ``p_c`` by client id.

    Entries are summed in client-id order, so the result does not depend on the order they arrived
    in. Each tensor keeps ``current``'s dtype and device.
    """
    if not entries:
        raise AggregationError("fedbuff_step: expected at least one buffered client, got none")
    ordered = sorted(entries, key=lambda entry: entry.client_id)
    ids = [entry.client_id for entry in ordered]
    if len(set(ids)) != len(ids):
        raise AggregationError(f"fedbuff_step: expected one entry per client, got {ids}")
    weights = [entry.weight for entry in ordered]
    shares = cap_shares(weights, max_share)  # also checks weights: finite, >= 0, sum > 0
    out = {}
    for key, reference in current.items():
        acc = reference.detach().to("cpu", torch.float64).clone()
        step = torch.zeros_like(acc)
        for entry, share in zip(ordered, shares, strict=True):
            if share > 0:
                step.add_(entry.mean_delta(key), alpha=share)
        out[key] = acc.add_(step, alpha=server_lr).to(device=reference.device, dtype=reference.dtype)
    check_finite(out, "fedbuff_step result")
    return out, dict(zip(ids, shares, strict=True))


class UpdateBuffer:
    """The updates that arrived since the last aggregation, folded per client (FedBuff's buffer)."""

    def __init__(self, settings: AsyncSettings) -> None:
        self.settings = settings
        self._entries: dict[str, BufferEntry] = {}
        self.updates = 0  # updates folded in since the last drain

    def add(self, client_id: str, tensors: Mapping[str, Tensor], base: Mapping[str, Tensor], *, staleness: int,
            weight: float, num_examples: int, metrics: Mapping[str, float]) -> float:
        """Fold one update trained from ``base`` (the global parts of its version); returns its discount."""
        check_compatible(base, tensors, f"update of {client_id}", against="global parts it started from")
        check_finite(tensors, f"update of {client_id}")
        if not (math.isfinite(weight) and weight >= 0):
            raise AggregationError(f"update of {client_id}: expected a finite weight >= 0, got {weight!r}")
        discount = staleness_discount(staleness, self.settings.staleness_exponent)
        delta = discounted_delta(tensors, base, discount)
        entry = self._entries.get(client_id)
        if entry is None:
            self._entries[client_id] = BufferEntry(client_id, float(weight), delta, 1, [staleness], num_examples,
                                                   dict(metrics))
        else:
            for key, value in delta.items():
                entry.discounted[key].add_(value)
            entry.weight = (entry.weight * entry.count + float(weight)) / (entry.count + 1)
            entry.count += 1
            entry.staleness.append(staleness)
            entry.num_examples += num_examples
            entry.metrics = dict(metrics)
        self.updates += 1
        return discount

    @property
    def clients(self) -> list[str]:
        return sorted(self._entries)

    def ready(self) -> bool:
        return len(self._entries) >= self.settings.buffer_size

    def drain(self) -> list[BufferEntry]:
        entries = [self._entries[cid] for cid in sorted(self._entries)]
        self._entries, self.updates = {}, 0
        return entries


class VersionStore:
    """The global parts of every version a client may still send an update against (bounded by the
    clients training plus the current one): ``delta_k`` needs ``g_{v_k}``."""

    def __init__(self) -> None:
        self._versions: dict[int, tuple[dict[str, Tensor], Any]] = {}

    def put(self, version: int, tensors: Mapping[str, Tensor], encoded: Any) -> None:
        self._versions[version] = ({k: v.detach().clone() for k, v in tensors.items()}, encoded)

    def tensors(self, version: int) -> dict[str, Tensor]:
        return self._versions[version][0]

    def encoded(self, version: int) -> Any:
        return self._versions[version][1]

    def keep(self, versions: Iterable[int]) -> None:
        """Forget every version not in ``versions``."""
        wanted = set(versions)
        for version in [v for v in self._versions if v not in wanted]:
            del self._versions[version]

    def __len__(self) -> int:
        return len(self._versions)
