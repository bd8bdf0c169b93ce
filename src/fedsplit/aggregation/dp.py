"""Client-level differential privacy for the client parts: DP-FedAvg (McMahan et al., ICLR 2018).

Each client's update to the global parts, ``delta_k = x_k - current``, is clipped to L2 norm ``C``
(over all of its head and tail tensors together), and Gaussian noise of standard deviation
``z * C`` is added to the *sum* of the clipped updates, so one client's participation changes the
released average by at most ``C / n`` and the Gaussian mechanism hides it. Two placements:

* ``noise = "central"``: the server clips the plaintext updates and adds ``N(0, (z C / n)^2)`` to
  the average (``n`` = clients aggregated). Needs plaintext updates (``mode = "plain"``).
* ``noise = "distributed"``: every client clips its own update and adds ``N(0, z^2 C^2 / n_expected)``
  (`privatize_update`) before it masks or encrypts it, so the sum of ``n_expected`` contributions
  carries exactly the central noise and the server never sees an un-noised update: this is the
  placement for ``secagg``, ``ckks`` and ``hybrid``. If only ``n < n_expected`` clients make it, the
  sum carries less noise; the accountant then charges the effective multiplier
  ``z * sqrt(n / n_expected)``.

The privacy spent is tracked with Google's ``dp-accounting`` RDP accountant: each round composes a
Poisson-subsampled Gaussian mechanism (sampling rate = clients in the round / clients available;
rate 1 without sampling). `DPFedAvg` reports ``dp_epsilon`` (at ``dp_delta``) with every round's
metrics and stops (`PrivacyBudgetExceededError`, before releasing the round) or warns when the
budget would be exceeded. The guarantee assumes equal client weights (the sensitivity ``C / n``),
so the wrapped strategy must weight updates uniformly (`uniform_weight`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from fedsplit.aggregation.errors import PrivacyBudgetExceededError
from fedsplit.strategy.base import (
    AggregateResult,
    ClientUpdate,
    Failure,
    RoundPlan,
    Strategy,
    TooFewResults,
    check_finite_number,
)

__all__ = ["clip_update", "privatize_update", "uniform_weight", "PrivacyAccountant", "DPFedAvg", "PrivacyBudgetWarning"]

_RDP_ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256)


class PrivacyBudgetWarning(UserWarning):
    """The run spent more than its privacy budget (``on_budget = "warn"``)."""


def uniform_weight(update: ClientUpdate) -> float:
    """Every client weighs 1: the weighting DP-FedAvg's sensitivity bound assumes."""
    return 1.0


def clip_update(
    tensors: Mapping[str, Tensor], current: Mapping[str, Tensor], clip: float
) -> tuple[dict[str, Tensor], float]:
    """``current + delta * min(1, C / ||delta||)`` over all tensors jointly; returns it and ``||delta||``."""
    check_finite_number(clip, "clip", positive=True)
    deltas = {k: t.detach().to(torch.float64) - _ref(current, k, t) for k, t in tensors.items()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = {k: (_ref(current, k, t) + deltas[k] * factor).to(t.dtype) for k, t in tensors.items()}
    return clipped, norm


def privatize_update(
    tensors: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    expected_clients: int,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Client side of distributed DP: clip the update to ``C``, add ``N(0, z^2 C^2 / n_expected)`` per element."""
    check_finite_number(noise_multiplier, "noise_multiplier")
    if noise_multiplier < 0 or expected_clients < 1:
        raise ValueError(
            f"expected noise_multiplier >= 0 and expected_clients >= 1, got {noise_multiplier}, {expected_clients}"
        )
    clipped, _ = clip_update(tensors, current, clip)
    std = noise_multiplier * clip / math.sqrt(expected_clients)
    return {k: (t.to(torch.float64) + _noise(t, std, generator)).to(t.dtype) for k, t in clipped.items()}


def _ref(current: Mapping[str, Tensor], key: str, like: Tensor) -> Tensor:
    if not current:  # no global parts yet: the update is the tensor itself
        return torch.zeros(like.shape, dtype=torch.float64)
    return current[key].detach().to(torch.float64)


def _noise(like: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, dtype=torch.float64, generator=generator) * std


class PrivacyAccountant:
    """Composes the rounds' subsampled Gaussian mechanisms with dp-accounting's RDP accountant."""

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta: expected 0 < delta < 1, got {delta}")
        self.delta = delta
        self._rounds: Counter[tuple[float, float]] = Counter()  # (sampling rate, noise multiplier) -> rounds

    def epsilon(self, extra: tuple[float, float] | None = None) -> float:
        """Epsilon at ``delta`` after the recorded rounds (and ``extra``, not recorded)."""
        import dp_accounting

        rounds = Counter(self._rounds)
        if extra is not None:
            rounds[extra] += 1
        if not rounds:
            return 0.0
        accountant = dp_accounting.rdp.RdpAccountant(list(_RDP_ORDERS))
        for (rate, multiplier), count in sorted(rounds.items()):
            if multiplier <= 0:
                return math.inf
            event = dp_accounting.GaussianDpEvent(multiplier)
            if rate < 1:
                event = dp_accounting.PoissonSampledDpEvent(rate, event)
            accountant.compose(event, count)
        return float(accountant.get_epsilon(self.delta))

    def record(self, rate: float, multiplier: float) -> None:
        self._rounds[(rate, multiplier)] += 1

    @property
    def rounds(self) -> int:
        return sum(self._rounds.values())


class DPFedAvg:
    """A `Strategy` wrapper adding DP-FedAvg clipping, noise and accounting to ``inner`` (composition)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        clip: float,
        noise_multiplier: float,
        delta: float,
        epsilon_budget: float = math.inf,
        noise: Literal["central", "distributed"] = "central",
        expected_clients: int = 0,
        on_budget: Literal["stop", "warn"] = "stop",
        seed: int = 0,
    ) -> None:
        check_finite_number(clip, "clip", positive=True)
        check_finite_number(noise_multiplier, "noise_multiplier")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier: expected >= 0, got {noise_multiplier}")
        if not epsilon_budget > 0:
            raise ValueError(f"epsilon_budget: expected > 0, got {epsilon_budget}")
        if noise not in ("central", "distributed"):
            raise ValueError(f"noise: expected central or distributed, got {noise!r}")
        if noise == "distributed" and expected_clients < 1:
            raise ValueError(f"expected_clients: expected >= 1 with distributed noise, got {expected_clients}")
        if on_budget not in ("stop", "warn"):
            raise ValueError(f"on_budget: expected stop or warn, got {on_budget!r}")
        weight_fn = getattr(inner, "weight_fn", uniform_weight)
        if weight_fn is not uniform_weight:
            raise ValueError(
                f"inner: DP-FedAvg's sensitivity C / n assumes equal weights; expected weight_fn=uniform_weight, "
                f"got {getattr(weight_fn, '__name__', weight_fn)!r}"
            )
        self.inner = inner
        self.clip, self.noise_multiplier, self.noise = float(clip), float(noise_multiplier), noise
        self.expected_clients, self.epsilon_budget, self.on_budget = expected_clients, epsilon_budget, on_budget
        self.accountant = PrivacyAccountant(delta)
        self._rate: dict[int, float] = {}
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def min_clients(self) -> int:
        return self.inner.min_clients

    @property
    def linear(self) -> bool:
        """Distributed noise on a linear rule needs only the sum (secagg / ckks); central clipping sees each update."""
        return self.noise == "distributed" and bool(getattr(self.inner, "linear", False))

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        if self.on_budget == "stop" and self.accountant.epsilon() > self.epsilon_budget:
            spent = self.accountant.epsilon()
            raise PrivacyBudgetExceededError(round, spent, self.epsilon_budget, self.accountant.delta)
        plan = self.inner.configure_round(round, available)
        self._rate[round] = len(plan.client_ids) / max(1, len(available))
        settings = dict(plan.settings, dp_clip=self.clip, dp_noise=self.noise)
        if self.noise == "distributed":  # clients call privatize_update with these
            settings.update(dp_noise_multiplier=self.noise_multiplier, dp_expected_clients=self.expected_clients)
        return replace(plan, settings=settings)

    def aggregate(
        self, round: int, results: Sequence[ClientUpdate], failures: Sequence[Failure], current: Mapping[str, Tensor]
    ) -> AggregateResult | TooFewResults:
        clipped_count = 0
        if self.noise == "central":
            clipped = []
            for update in results:
                tensors, norm = clip_update(update.tensors, current, self.clip)
                clipped_count += norm > self.clip
                clipped.append(replace(update, tensors=tensors))
            results = clipped
        result = self.inner.aggregate(round, results, failures, current)
        if isinstance(result, TooFewResults):
            return result  # no round, no noise, nothing spent
        n = len(result.clients)
        multiplier = self.noise_multiplier
        tensors = result.tensors
        if self.noise == "central":
            std = self.noise_multiplier * self.clip / n
            noisy = {k: t.to(torch.float64) + _noise(t, std, self._generator) for k, t in tensors.items()}
            tensors = {k: noisy[k].to(t.dtype) for k, t in tensors.items()}
        else:
            multiplier = self.noise_multiplier * math.sqrt(min(n, self.expected_clients) / self.expected_clients)
            std = multiplier * self.clip / n
        rate = self._rate.pop(round, 1.0)
        epsilon = self.accountant.epsilon((rate, multiplier))
        if epsilon > self.epsilon_budget:
            if self.on_budget == "stop":
                raise PrivacyBudgetExceededError(round, epsilon, self.epsilon_budget, self.accountant.delta)
            warnings.warn(
                f"round {round}: privacy spent epsilon = {epsilon:.4g} exceeds the budget {self.epsilon_budget:g}",
                PrivacyBudgetWarning, stacklevel=2,
            )
        self.accountant.record(rate, multiplier)
        metrics = dict(result.metrics)
        metrics.update(self.privacy_report(epsilon, rate, multiplier, std, clipped_count / max(1, len(results))))
        return replace(result, tensors=tensors, metrics=metrics)

    def privacy_report(
        self, epsilon: float, rate: float, multiplier: float, std: float, clipped_fraction: float
    ) -> dict[str, float]:
        """The per-round privacy metrics (what the coordinator writes to metrics.jsonl)."""
        return {
            "dp_epsilon": epsilon,
            "dp_delta": self.accountant.delta,
            "dp_epsilon_budget": self.epsilon_budget,
            "dp_rounds": float(self.accountant.rounds),
            "dp_sampling_rate": rate,
            "dp_noise_multiplier": multiplier,
            "dp_noise_std": std,
            "dp_clip": self.clip,
            "dp_clipped_fraction": clipped_fraction,
        }
