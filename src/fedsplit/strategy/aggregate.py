"""Pure aggregation math: the weighted average of client adapter states (FedAvg).

FL-GLM (arXiv 2406.14898) averages the clients' head and tail parameters after every round;
here those parameters are PEFT adapter state dicts. These functions take plain tensors and
weights, know nothing about clients or rounds, and are tested with tiny tensors, as in Flower's
``flwr/server/strategy/aggregate.py``.

Order of inputs: the sum runs in input order, in float64, and is cast back to each tensor's
dtype only at the end. Reordering the inputs therefore changes the float64 sum by at most a few
ulps of float64 (~1e-16 relative), far below the precision of float32/fp16/bf16 outputs, so the
cast result is the same except in the rare case where the float64 value sits on a rounding
boundary of the output dtype. Callers that need bit-identical results whatever the arrival order
(e.g. ``FedAvg``) sort their inputs first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


class AggregationError(ValueError):
    """The updates cannot be averaged: mismatched keys/shapes/dtypes, bad weights or values."""


def weighted_average(
    updates: Sequence[tuple[Mapping[str, Tensor], float]],
    *,
    labels: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Weighted mean of state dicts: ``sum_i w_i * x_i / sum_i w_i`` for every key.

    ``updates`` are ``(tensors, weight)`` pairs; ``labels`` (e.g. client ids) name the updates in
    error messages, otherwise they are named by index. Every update must have the same keys,
    shapes and floating dtypes as the first; weights must be finite, >= 0 and sum to > 0; tensors
    must be finite. The result keeps each tensor's dtype and device.
    """
    if not updates:
        raise AggregationError("expected at least one update, got none")
    names = _labels(len(updates), labels)
    weights = [_check_weight(weight, name) for (_, weight), name in zip(updates, names, strict=False)]
    total = math.fsum(weights)
    if total <= 0:
        raise AggregationError(f"expected the weights to sum to > 0, got {total} ({weights})")
    reference = updates[0][0]
    for (tensors, _), name in zip(updates, names, strict=False):
        check_compatible(reference, tensors, name)
        check_finite(tensors, name)
    states = [tensors for tensors, _ in updates]
    return {key: _mean(key, states, weights, total) for key in reference}


def check_compatible(
    reference: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor],
    name: str,
    *,
    against: str = "reference",
    error: Callable[[str], Exception] = AggregationError,
) -> None:
    """Raise ``error`` unless ``tensors`` has ``reference``'s keys, shapes and dtypes.

    The one adapter compatibility check: the strategies use it on client updates, the round
    loop on what a client uploads (``error=ProtocolError``) and on a checkpoint it resumes.
    """
    missing, unexpected = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
    if missing or unexpected:
        raise error(
            f"{name}: keys do not match the {against}: "
            f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}"
        )
    for key, expected in reference.items():
        got, where = tensors[key], f"{name}[{key}]"
        if not isinstance(got, Tensor):
            raise error(f"{where}: expected a torch.Tensor, got {type(got).__name__}")
        if got.shape != expected.shape:
            raise error(f"{where}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != expected.dtype:
            raise error(f"{where}: expected dtype {expected.dtype}, got {got.dtype}")


def check_finite(tensors: Mapping[str, Tensor], name: str) -> None:
    """Raise ``AggregationError`` on a non-floating tensor or one holding NaN/Inf."""
    for key, tensor in tensors.items():
        where = f"{name}: key {key!r}"
        if not torch.is_floating_point(tensor):
            raise AggregationError(f"{where}: expected a floating dtype, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise AggregationError(f"{where}: expected finite values, got NaN or Inf")


def _labels(count: int, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [f"update {index}" for index in range(count)]
    if len(labels) != count:
        raise ValueError(f"expected {count} labels (one per update), got {len(labels)}")
    return list(labels)


def _check_weight(weight: float, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise AggregationError(f"{name}: expected a real weight, got {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise AggregationError(f"{name}: expected a finite weight >= 0, got {value}")
    return value


def _mean(
    key: str, states: list[Mapping[str, Tensor]], weights: list[float], total: float
) -> Tensor:
    first = states[0][key]
    acc = torch.zeros(first.shape, dtype=torch.float64)
    for tensors, weight in zip(states, weights, strict=False):
        if weight > 0:  # a zero weight drops the update; skip the work
            acc.add_(tensors[key].detach().to(device="cpu", dtype=torch.float64), alpha=weight)
    return (acc / total).to(device=first.device, dtype=first.dtype)


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Normalized shares ``w_k / sum(w)`` with no share above ``max_share``: iterative capping.

    Shares above the cap are set to the cap and the mass they lose is spread over the others in
    proportion to their weights, repeatedly, until no share exceeds the cap (water-filling: the
    result is the closest capped distribution that keeps the uncapped clients' ratios). Zero
    weights stay zero. With ``k`` positive weights and ``k * max_share < 1`` no capped
    distribution exists; the most even one, ``1/k`` each, is returned. The shares sum to 1.
    """
    check_finite_number_in(max_share, "max_share")
    if not 0 < max_share <= 1:
        raise AggregationError(f"max_share: expected a value in (0, 1], got {max_share}")
    values = [_check_weight(weight, f"weight {index}") for index, weight in enumerate(weights)]
    total = math.fsum(values)
    if total <= 0:
        raise AggregationError(f"expected the weights to sum to > 0, got {total} ({values})")
    positive = [index for index, value in enumerate(values) if value > 0]
    if len(positive) * max_share < 1:  # infeasible: the most even distribution
        return [1 / len(positive) if value > 0 else 0.0 for value in values]
    capped: set[int] = set()
    shares = [value / total for value in values]
    while True:
        free = [index for index in positive if index not in capped]
        mass = 1 - max_share * len(capped)  # what the uncapped clients share
        free_total = math.fsum(values[index] for index in free)
        for index in free:
            shares[index] = mass * values[index] / free_total
        over = [index for index in free if shares[index] > max_share * (1 + 1e-12)]
        if not over:
            for index in capped:
                shares[index] = max_share
            return shares
        capped.update(over)


def check_finite_number_in(value: float, name: str) -> None:
    """Raise ``AggregationError`` unless ``value`` is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise AggregationError(f"{name}: expected a finite number, got {value!r}")


def check_states(states: Sequence[Mapping[str, Tensor]], labels: Sequence[str] | None = None) -> list[str]:
    """Check that every state has the first one's keys, shapes, dtypes and only finite values."""
    if not states:
        raise AggregationError("expected at least one update, got none")
    names = _labels(len(states), labels)
    for tensors, name in zip(states, names, strict=True):
        check_compatible(states[0], tensors, name)
        check_finite(tensors, name)
    return names


def stacked(states: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """The ``key`` tensors of all states stacked on a new first axis, in float64 on the CPU: (n, ...)."""
    return torch.stack([state[key].detach().to(device="cpu", dtype=torch.float64) for state in states])


def like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` cast back to ``reference``'s dtype and device."""
    return value.to(device=reference.device, dtype=reference.dtype)
