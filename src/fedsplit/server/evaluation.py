"""The server's side of federated evaluation: the EVALUATING stage between rounds (issue 12, item 1).

FL-GLM (arXiv 2406.14898) compares federated split training with centralized training on held-out
data; in a federation nobody holds that data but the clients. After a round is aggregated
(:class:`~fedsplit.server.rounds.RoundStage` ``AGGREGATING -> EVALUATING``), the round's
participants evaluate the new global parts on their own held-out examples through the split::

    client                                   server (stage EVALUATING)
    JOIN_ROUND  ---------------------------> RoundPlan(evaluate = true, adapters = new global parts)
    FORWARD(train = false) x n  -----------> trunk forward, no graph, no update
    EVAL_REPORT(num_examples, metrics) ----> checked, pooled by :func:`fedsplit.eval.aggregate_metrics`
                                             (means weighted by examples, loss by tokens, summed
                                             confusion matrices); logged as ``federated_eval``

Only aggregate numbers leave a client. The stage ends when every asked client reported, was
refused or left, or after ``timeout_s``; then the next round's lobby opens (or the run is DONE).
Evaluation FORWARDs are served between rounds only (never in TRAINING or AGGREGATING: mid-round
they would show a client each individual trunk step of the others), rate limited per client.

A report is data from an untrusted client: it is refused (and left out of the pool, the stage
going on) unless every count is a non-negative integer within bounds (``num_examples`` at most
``max_examples``, or the client's data report), ``n`` equals ``num_examples``, the confusion
matrix sums to it, proportions lie in [0, 1], the loss is finite and >= 0 with at most
``max_length`` scored tokens per example, and every name is a known metric.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedsplit.protocol import ProtocolError, encode_named, pb
from fedsplit.server.rounds import RoundStage, Session
from fedsplit.strategy.base import ClientUpdate

log = logging.getLogger(__name__)

PROPORTION_METRICS = frozenset({"accuracy", "accuracy_norm", "exact_match", "macro_f1", "rouge1", "rouge2", "rougeL"})
COUNT_METRICS = frozenset({"n", "tokens"})
OTHER_METRICS = frozenset({"loss", "perplexity"})
_CONFUSION = re.compile(r"cm\.(\d{1,3})\.(\d{1,3})")
MAX_METRICS = 512  # names per report (a confusion matrix of 20 classes is 400)
AUDIT_PREFIX = "audit_"  # ClientUpdate.metrics of the in-run privacy audit (client/evaluation.py)

ASKED, PLANNED, REPORTED, REFUSED, GONE = "asked", "planned", "reported", "refused", "gone"


@dataclass
class FederatedEvalConfig:
    """Federated evaluation between rounds. Times are seconds."""

    enabled: bool = field(default=False, metadata={"help": "after each round the participants evaluate the new "
                                                   "global parts on their own held-out data"})
    timeout_s: float = field(default=600.0, metadata={"help": "the EVALUATING stage ends this long after it opened"})
    baseline: bool = field(default=True, metadata={"help": "before round 1 the first lobby also scores the starting "
                                                   "parts (round 0: zero-shot with fresh LoRA adapters)"})
    max_examples: int = field(default=0, metadata={"help": "most held-out examples a report may claim (0: the "
                                                   "client's data report)"})
    max_length: int = field(default=0, metadata={"help": "most scored tokens per example (0: unchecked)"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"evaluation.timeout_s: expected a finite value > 0, got {self.timeout_s!r}")
        for name in ("max_examples", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"evaluation.{name}: expected an int >= 0, got {value!r}")


def _count(name: str, value: float, most: float) -> int:
    if not (math.isfinite(value) and value == int(value) and 0 <= value <= most):
        raise ProtocolError(f"EvalReport.metrics[{name}]: expected a whole count in 0..{most:g}, got {value!r}")
    return int(value)


def check_eval_report(request: pb.EvalReport, round: int, most_examples: int, max_length: int = 0) -> dict[str, float]:
    """The report's metrics if every number in it is possible, else :class:`ProtocolError` (BAD_REQUEST)."""
    if request.round != round:
        raise ProtocolError(f"EvalReport.round: expected {round}, got {request.round}", code=pb.FAILED_PRECONDITION)
    n = int(request.num_examples)
    if n > most_examples:
        raise ProtocolError(f"EvalReport.num_examples: expected 0..{most_examples}, got {n}")
    metrics = dict(request.metrics)
    if n == 0:
        if metrics:
            raise ProtocolError(f"EvalReport: no examples but {len(metrics)} metrics")
        return {}
    if len(metrics) > MAX_METRICS:
        raise ProtocolError(f"EvalReport.metrics: expected at most {MAX_METRICS} names, got {len(metrics)}")
    confusion = 0
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise ProtocolError(f"EvalReport.metrics[{name}]: expected a finite number, got {value!r}")
        if name in PROPORTION_METRICS and not 0.0 <= value <= 1.0:
            raise ProtocolError(f"EvalReport.metrics[{name}]: expected a proportion in [0, 1], got {value!r}")
        if _CONFUSION.fullmatch(name):
            confusion += _count(name, value, n)
        elif name not in PROPORTION_METRICS | COUNT_METRICS | OTHER_METRICS:
            raise ProtocolError(f"EvalReport.metrics: unknown metric {name[:64]!r}")
    if _count("n", metrics.get("n", -1.0), n) != n:
        raise ProtocolError(f"EvalReport.metrics[n]: expected num_examples = {n}, got {metrics['n']!r}")
    if any(_CONFUSION.fullmatch(name) for name in metrics) and confusion != n:
        raise ProtocolError(f"EvalReport.metrics[cm.*]: the confusion matrix counts {confusion} examples, not {n}")
    if "loss" in metrics:
        if not metrics["loss"] >= 0:
            raise ProtocolError(f"EvalReport.metrics[loss]: expected >= 0, got {metrics['loss']!r}")
        tokens = _count("tokens", metrics.get("tokens", -1.0), n * max_length if max_length else 2.0**53)
        if tokens < 1:
            raise ProtocolError("EvalReport.metrics[tokens]: a loss needs at least one scored token")
    metrics.pop("perplexity", None)  # recomputed from the pooled loss
    return metrics


def audit_scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """The privacy-audit scores in an update's metrics; shares outside [0, 1] (or not finite) are dropped."""
    out = {}
    for name, value in metrics.items():
        if name.startswith(AUDIT_PREFIX) and math.isfinite(value) and value >= 0:
            if name == AUDIT_PREFIX + "positions" or value <= 1.0:
                out[name[len(AUDIT_PREFIX):]] = float(value)
    return out


class RoundEvaluation:
    """Bookkeeping of the EVALUATING stage and of the evaluation FORWARDs; call with ``cond`` held
    unless said otherwise. ``history`` keeps each round's ``federated_eval`` record."""

    def __init__(self, config: FederatedEvalConfig, cond: threading.Condition, log_event: Callable[..., object],
                 *, eval_burst: int, eval_per_s: float) -> None:
        self.config, self._cond, self._log = config, cond, log_event
        self._burst, self._per_s = eval_burst, eval_per_s
        self.in_flight = 0  # evaluation FORWARDs being served: a round starts only when none is
        self.history: list[dict[str, Any]] = []
        self._round = 0
        self._adapters: list[pb.NamedTensor] = []
        self._asked: dict[str, str] = {}
        self._reports: dict[str, tuple[dict[str, float], int]] = {}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def baseline(self) -> bool:
        """Whether the first lobby scores the starting parts before round 1 (round 0)."""
        return self.config.enabled and self.config.baseline

    # -- evaluation FORWARDs (lock not held) ---------------------------------------------------
    @contextlib.contextmanager
    def forward(self, session: Session | None, state: Callable[[], tuple[RoundStage, int]],
                what: str = "evaluation", *, anytime: bool = False) -> Iterator[None]:
        """A request that reads the trunk without training it: between rounds only, rate-bounded.

        Mid-round every trunk step changes the trunk, so an evaluation request would show a client
        outside the round each individual update of the others (an oracle); between rounds the
        trunk is the aggregate everyone receives anyway. Split generation (``what="generation"``,
        no ``session``: its own service bounds it) goes through the same gate; ``anytime`` lets a
        request that only frees state (GENERATE_END) through mid-round. A round starts only when
        no such request is in flight.
        """
        with self._cond:
            stage, completed = state()
            if not anytime and stage in (RoundStage.TRAINING, RoundStage.AGGREGATING):
                raise ProtocolError(
                    f"{what} is served between rounds only; round {completed + 1} is "
                    f"{stage.value}, ask again after it", code=pb.FAILED_PRECONDITION)
            if session is not None:
                session.take_eval_token(self._burst, self._per_s, time.monotonic())
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    # -- the stage -----------------------------------------------------------------------------
    def run(self, round: int, clients: Sequence[str], adapters: Mapping[str, Tensor],
            sessions: Mapping[str, Session], check: Callable[[], None]) -> dict[str, Any]:
        """Ask ``clients`` to evaluate ``adapters`` and wait for their reports (a client whose sessions
        all ended is not waited for); log and return the pool. ``check`` raises when the run stops."""
        self._round, self._adapters = round, encode_named(adapters)
        self._asked, self._reports = dict.fromkeys(clients, ASKED), {}
        deadline = time.monotonic() + self.config.timeout_s
        while self.pending():
            check()
            for cid in self.pending():
                if sessions[cid].open == 0:
                    self._asked[cid] = GONE
            now = time.monotonic()
            if now >= deadline:
                log.warning("round %d: evaluation timed out waiting for %s", round, self.pending())
                break
            self._cond.wait(timeout=min(deadline - now, 0.5))
        return self._close()

    def pending(self) -> list[str]:
        return sorted(cid for cid, state in self._asked.items() if state in (ASKED, PLANNED))

    def plan_for(self, client_id: str) -> pb.RoundPlan | None:
        """The evaluation plan of an asked client that has not reported yet (else None)."""
        if self._asked.get(client_id) not in (ASKED, PLANNED):
            return None
        self._asked[client_id] = PLANNED
        return pb.RoundPlan(round=self._round, evaluate=True, adapters=self._adapters)

    def receive(self, client_id: str, request: pb.EvalReport, stage: RoundStage, data_report: int) -> pb.EvalAck:
        """Check and keep one EVAL_REPORT; a refused report leaves the client out of this round's pool."""
        if stage is not RoundStage.EVALUATING or self._asked.get(client_id) not in (ASKED, PLANNED):
            raise ProtocolError(f"EvalReport: no evaluation is open for client {client_id} (round {request.round} "
                                f"sent; stage {stage.value})", code=pb.FAILED_PRECONDITION)
        most = self.config.max_examples or data_report
        try:
            metrics = check_eval_report(request, self._round, most, self.config.max_length)
        except ProtocolError as exc:
            self._asked[client_id] = REFUSED
            self._log("eval_refused", round=self._round, client=client_id, reason=str(exc))
            log.warning("round %d: evaluation report of %s refused: %s", self._round, client_id, exc)
            self._cond.notify_all()
            raise
        self._asked[client_id] = REPORTED
        self._reports[client_id] = (metrics, int(request.num_examples))
        self._cond.notify_all()
        return pb.EvalAck(round=self._round, accepted=True)

    def _close(self) -> dict[str, Any]:
        from fedsplit.eval.stats import aggregate_metrics

        counted = {cid: report for cid, report in sorted(self._reports.items()) if report[1] > 0}
        record: dict[str, Any] = {
            "round": self._round,
            "clients": {cid: dict(m, num_examples=n) for cid, (m, n) in counted.items()},
            "num_examples": sum(n for _, n in counted.values()),
            "aggregate": aggregate_metrics(list(counted.values())) if counted else {},
            "missing": sorted(cid for cid, state in self._asked.items() if state != REPORTED),
        }
        self._asked, self._adapters = {}, []
        self.history.append(record)
        self._log("federated_eval", **record)
        return record

    # -- the in-run privacy audit --------------------------------------------------------------
    def log_audit(self, round: int, results: Sequence[ClientUpdate]) -> None:
        """One ``privacy_audit`` event per client whose update carried audit scores."""
        for update in results:
            scores = audit_scores(update.metrics)
            if scores:
                self._log("privacy_audit", round=round, client=update.client_id, **scores)
