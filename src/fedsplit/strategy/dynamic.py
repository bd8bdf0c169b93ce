"""Dynamic aggregation weights of the cross-cloud seed (arXiv 2503.12226)::

    omega_k = L_k / (|D_k| * B_k^alpha),        w = sum_k omega_k w_k / sum_k omega_k

``L_k`` is client k's training loss this round (``ClientUpdate.metrics["loss"]``), ``|D_k|`` its
number of examples and ``B_k`` its link bandwidth, measured by the transport and carried in
``ClientUpdate.metrics[BANDWIDTH_METRIC]`` (bytes per second of the client's traffic this round).
``loss_term`` orients the loss: ``"loss"`` uses ``L_k`` as in the paper (clients that fit their
data worst pull hardest), ``"inverse"`` uses ``1 / L_k`` (clients that fit best pull hardest).
The weights enter FedAvg as a :data:`~fedsplit.strategy.base.WeightFn`; FedAvg's ``max_share``
bounds any client's share, whatever loss or bandwidth it reports.

Each ``omega_k`` depends only on client k's own numbers, so a client can pre-weight its own
update: the rule stays linear and runs under secure aggregation (the capping by ``max_share``
needs the weights, which are scalars, not the updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedsplit.strategy.aggregate import AggregationError
from fedsplit.strategy.base import ClientUpdate

LOSS_METRIC = "loss"
BANDWIDTH_METRIC = "bandwidth_bytes_per_s"
LOSS_TERMS = ("loss", "inverse")


def dynamic_weights(
    losses: Sequence[float],
    sizes: Sequence[int],
    bandwidths: Sequence[float],
    *,
    alpha: float,
    loss_term: str = "loss",
) -> list[float]:
    """``omega_k = L_k^{+-1} / (|D_k| * B_k^alpha)`` for every client (not normalized)."""
    if not len(losses) == len(sizes) == len(bandwidths):
        got = f"{len(losses)}, {len(sizes)}, {len(bandwidths)}"
        raise AggregationError(f"expected one loss, size and bandwidth per client, got {got}")
    rows = zip(losses, sizes, bandwidths, strict=True)
    return [omega(loss, size, bandwidth, alpha=alpha, loss_term=loss_term) for loss, size, bandwidth in rows]


def omega(loss: float, size: int, bandwidth: float, *, alpha: float, loss_term: str = "loss") -> float:
    """One client's ``omega_k``; a client with no examples weighs 0."""
    if loss_term not in LOSS_TERMS:
        raise ValueError(f"loss_term: expected one of {', '.join(LOSS_TERMS)}, got {loss_term!r}")
    if not math.isfinite(loss) or loss <= 0:
        raise AggregationError(f"loss: expected a finite value > 0, got {loss}")
    if not math.isfinite(bandwidth) or bandwidth <= 0:
        raise AggregationError(f"bandwidth: expected a finite value > 0 bytes/s, got {bandwidth}")
    if size <= 0:
        return 0.0
    term = loss if loss_term == "loss" else 1 / loss
    cost: float = size * bandwidth**alpha  # float ** float is typed Any (it may be complex)
    return term / cost


@dataclass(frozen=True)
class DynamicWeight:
    """A ``WeightFn``: :func:`omega` from an update's metrics and number of examples."""

    alpha: float = 1.0
    loss_term: str = "loss"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha: expected a finite number, got {self.alpha!r}")
        if self.loss_term not in LOSS_TERMS:
            raise ValueError(f"loss_term: expected one of {', '.join(LOSS_TERMS)}, got {self.loss_term!r}")

    def __call__(self, update: ClientUpdate) -> float:
        for metric in (LOSS_METRIC, BANDWIDTH_METRIC):
            if metric not in update.metrics and not (metric == BANDWIDTH_METRIC and self.alpha == 0):
                got = sorted(update.metrics)
                who = f"client {update.client_id!r}"
                raise AggregationError(f"{who}: the dynamic weights need metric {metric!r}, got {got}")
        bandwidth = float(update.metrics.get(BANDWIDTH_METRIC, 1.0))
        try:
            loss = float(update.metrics[LOSS_METRIC])
            return omega(loss, update.num_examples, bandwidth, alpha=self.alpha, loss_term=self.loss_term)
        except AggregationError as err:
            raise AggregationError(f"client {update.client_id!r}: {err}") from None
