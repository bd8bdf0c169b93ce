"""Exceptions raised by `fedsplit.aggregation`.

A fault by one client (a malformed share, a wrong-size upload, a tampered ciphertext) is *data*:
the server names the client in the round's ``excluded`` map and goes on. Only conditions that make
the whole round impossible or unsafe raise.
"""

from __future__ import annotations

__all__ = [
    "PrivateAggregationError",
    "RoundAbortedError",
    "UnmaskRefusedError",
    "ProtocolStageError",
    "MalformedMessageError",
    "PrivacyBudgetExceededError",
]


class PrivateAggregationError(Exception):
    """Base class of every error raised by `fedsplit.aggregation`."""


class RoundAbortedError(PrivateAggregationError):
    """The round cannot be completed safely (too many dropouts, unrecoverable masks).

    Nothing is aggregated: the caller keeps the previous global parts.
    """


class UnmaskRefusedError(PrivateAggregationError):
    """A client refuses the server's unmask request (it would reveal an individual input)."""


class ProtocolStageError(PrivateAggregationError):
    """A party was asked to do a step out of order (e.g. mask before sharing keys)."""


class MalformedMessageError(PrivateAggregationError):
    """A message cannot be parsed or does not verify; the sender is named in the message."""


class PrivacyBudgetExceededError(PrivateAggregationError):
    """Releasing this round would spend more than the configured (epsilon, delta) budget."""

    def __init__(self, round: int, epsilon: float, budget: float, delta: float) -> None:
        self.round = round
        self.epsilon = epsilon
        self.budget = budget
        self.delta = delta
        super().__init__(
            f"round {round}: releasing it would spend epsilon = {epsilon:.4g} at delta = {delta:g}, "
            f"over the budget epsilon <= {budget:g}; the round was not released (global parts unchanged)"
        )
