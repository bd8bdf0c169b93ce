"""The aggregation interface of FL-GLM (arXiv 2406.14898): what the server's round loop calls.

Each round the loop asks the strategy which clients to train and with what settings
(``configure_round``), runs the split training, then hands the strategy the client parts that
came back (``ClientUpdate``: PEFT adapter state dicts of the head and tail, keys ``"head/..."``,
``"tail/..."``) together with the clients that did not (``Failure``, as data, never as an
exception) and the current global client parts. The strategy returns the new global client
parts (``AggregateResult``), or ``TooFewResults`` when fewer than its ``min_clients`` came back.
The shape follows Flower's ``Strategy`` (``configure_fit`` / ``aggregate_fit``), cut down to what
split fine-tuning needs.

How later work plugs in without changing this interface:

- Dynamic and robust weights: ``FedAvg(weight_fn=...)`` maps each update to a weight
  (default ``num_examples``); a weight of 0 drops a client, so reputation scores, loss-based
  weights or outlier filters are a ``WeightFn``. Coordinate-wise robust rules (median, trimmed
  mean, Krum) are new pure functions in ``aggregate.py`` behind another ``Strategy``.
- Differential privacy: a wrapper ``Strategy`` (composition, as Flower's
  ``DifferentialPrivacyServerSideFixedClipping``) clips each update's difference to ``current``
  before delegating to the wrapped strategy's ``aggregate`` and adds calibrated noise to the
  result; its ``configure_round`` adds the clipping norm to ``RoundPlan.settings``.
- Secure aggregation with dropout recovery, homomorphic or hybrid encryption: clients upload
  pre-weighted, masked or encrypted tensors; a strategy sums them and divides by the summed
  weight. ``failures`` names the dropped clients, which is exactly the input that mask recovery
  needs, and ``stage`` says whether a client dropped before or after sharing its keys.
- Asynchronous rounds: ``round`` is the server's round counter; a staleness-aware ``WeightFn``
  discounts updates trained on older global parts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor


class StrategyError(RuntimeError):
    """A round cannot go on as configured (too few clients or results)."""


class NotEnoughClientsError(StrategyError):
    """Fewer clients are available than the strategy needs to start a round."""


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a round: its adapter tensors and how it trained."""

    client_id: str
    tensors: dict[str, Tensor]  # PEFT adapter state dict of head and tail: "head/...", "tail/..."
    num_examples: int  # training examples seen this round: FedAvg's default weight
    metrics: dict[str, float]  # e.g. {"loss": 2.31}; averaged across clients by the strategy

    def __post_init__(self) -> None:
        _check_id(self.client_id, "client_id")
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int):
            raise TypeError(f"num_examples: expected int, got {type(self.num_examples).__name__}")
        if self.num_examples < 0:
            raise ValueError(f"num_examples: expected >= 0, got {self.num_examples}")
        for name, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                got = type(value).__name__
                raise TypeError(f"metrics[{name!r}]: expected a real number, got {got}")


@dataclass(frozen=True)
class Failure:
    """A client that did not return a result, and where in the protocol it stopped."""

    client_id: str
    reason: str  # human-readable, e.g. "timeout after 30 s"
    stage: str  # the protocol stage's name, e.g. "train", "upload"

    def __post_init__(self) -> None:
        _check_id(self.client_id, "client_id")
        _check_id(self.stage, "stage")


@dataclass(frozen=True)
class RoundPlan:
    """The clients picked for a round and the settings they train with."""

    round: int
    client_ids: list[str]
    settings: dict[str, float | int | str]  # e.g. {"local_steps": 4, "lr": 2e-4}

    def __post_init__(self) -> None:
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError(f"client_ids: expected unique ids, got {self.client_ids}")


@dataclass(frozen=True)
class TooFewResults:
    """A round that cannot be aggregated: fewer results than the strategy's ``min_clients``.

    Returned by :meth:`Strategy.aggregate` as data, not raised: the round loop rolls the round
    back and tries it again, and logs :attr:`reason`.
    """

    round: int
    needed: int
    results: list[str]  # ids of the clients that did send a result
    failures: list[Failure]

    @property
    def reason(self) -> str:
        causes = "; ".join(f"{f.client_id} at stage {f.stage!r}: {f.reason}" for f in self.failures)
        return (
            f"round {self.round}: expected at least {self.needed} results, got {len(self.results)} "
            f"(results: {', '.join(self.results) or 'none'}; failures: {causes or 'none'})"
        )


@dataclass(frozen=True)
class AggregateResult:
    """The new global client parts and what the round reported."""

    tensors: dict[str, Tensor]
    metrics: dict[str, float]
    num_examples: int  # summed over the aggregated clients
    clients: list[str]  # ids of the clients whose updates were aggregated


WeightFn = Callable[[ClientUpdate], float]
"""Maps one update to its aggregation weight (finite, >= 0; 0 drops the update)."""


def num_examples(update: ClientUpdate) -> float:
    """FedAvg's weight: the number of examples the client trained on (McMahan et al., 2017)."""
    return float(update.num_examples)


@runtime_checkable
class Strategy(Protocol):
    """Chooses the clients of each round and merges what they send back.

    ``min_clients`` is the one owner of that number: the round loop waits for that many clients
    before a round starts, and ``aggregate`` returns :class:`TooFewResults` below it.
    """

    @property
    def min_clients(self) -> int:
        """The fewest clients a round starts with and the fewest results it aggregates."""
        ...

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        """Pick the clients of ``round`` among ``available`` and the settings they train with."""
        ...

    def aggregate(
        self,
        round: int,
        results: Sequence[ClientUpdate],
        failures: Sequence[Failure],
        current: Mapping[str, Tensor],
    ) -> AggregateResult | TooFewResults:
        """Merge the updates of ``round`` into new global client parts (``current``: the old).

        Fewer than ``min_clients`` results give :class:`TooFewResults` (data, not an exception).
        """
        ...


def check_round(round: int) -> None:
    """Raise unless ``round`` is a non-negative int (the loop chooses to start at 0 or 1)."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round: expected an int >= 0, got {round!r}")


def check_finite_number(value: float, name: str, *, positive: bool = False) -> None:
    """Raise unless ``value`` is a finite real number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected > 0, got {value!r}")


def _check_id(value: str, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
