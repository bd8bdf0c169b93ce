"""What the round coordinator keeps about a run: stages, configuration, sessions, participants, rounds.

The stage machines of :mod:`fedsplit.server.coordinator` (FL-GLM, arXiv 2406.14898, Alg. 1) as
tables, the data each round carries, and the checks an incoming update must pass before the
strategy sees it: keys, shapes and dtypes of the global parts, and how far it moved from them
(:mod:`fedsplit.strategy.bounds`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from google.protobuf.message import Message
from torch import Tensor

from fedsplit.config import ServerConfig
from fedsplit.protocol import ProtocolError, kind_name, pb
from fedsplit.server.checkpoint import Checkpoint, CheckpointError, TrunkHolder, TrunkState
from fedsplit.server.stages import StageError, check_transition
from fedsplit.strategy.aggregate import check_compatible
from fedsplit.strategy.base import ClientUpdate, Failure, RoundPlan, StrategyError
from fedsplit.strategy.bounds import l2_distance, linf_distance
from fedsplit.train.optim import schedule_horizon

StageTransitionError = StageError  # the coordinator's name for it
log = logging.getLogger(__name__)
_PRECONDITION = pb.FAILED_PRECONDITION
_SERVER = ServerConfig()


def _help(name: str) -> str:
    return str(next(f for f in fields(ServerConfig) if f.name == name).metadata["help"])


class RoundStage(enum.Enum):
    WAITING_FOR_CLIENTS = "waiting_for_clients"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"  # federated evaluation of the new global parts (server/evaluation.py)
    DONE = "done"
    FAILED = "failed"


ROUND_NEXT: dict[RoundStage, frozenset[RoundStage]] = {
    RoundStage.WAITING_FOR_CLIENTS: frozenset({RoundStage.TRAINING, RoundStage.EVALUATING,  # round 0: baseline
                                               RoundStage.DONE, RoundStage.FAILED}),
    RoundStage.TRAINING: frozenset({RoundStage.AGGREGATING, RoundStage.FAILED}),
    RoundStage.AGGREGATING: frozenset({RoundStage.WAITING_FOR_CLIENTS, RoundStage.EVALUATING, RoundStage.DONE,
                                       RoundStage.FAILED}),
    RoundStage.EVALUATING: frozenset({RoundStage.WAITING_FOR_CLIENTS, RoundStage.DONE, RoundStage.FAILED}),
    RoundStage.DONE: frozenset(),
    RoundStage.FAILED: frozenset(),
}


class ClientStage(enum.Enum):
    """Where one participant is within the current round (``Failure.stage`` is its value)."""

    PICKED = "picked"  # chosen by the strategy; has not collected its plan yet
    TRAINING = "training"  # has its plan; owes local_steps split steps and an update
    SUBMITTED = "submitted"  # its update was accepted
    FAILED = "failed"


CLIENT_NEXT: dict[ClientStage, frozenset[ClientStage]] = {
    ClientStage.PICKED: frozenset({ClientStage.TRAINING, ClientStage.FAILED}),
    ClientStage.TRAINING: frozenset({ClientStage.SUBMITTED, ClientStage.FAILED}),
    ClientStage.SUBMITTED: frozenset(),
    ClientStage.FAILED: frozenset(),
}


class TrunkService(TrunkHolder, Protocol):
    """The trunk side the coordinator delegates to: :class:`~fedsplit.server.trunk.TrunkServer`,
    :class:`~fedsplit.server.batching.BatchingTrunkServer` or the hierarchical ``ReplicaRouter``."""

    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message: ...

    def abort(self, client_id: str) -> bool: ...

    def end_round(self, round: int) -> object: ...


class RunStoppedError(RuntimeError):
    """:meth:`RoundCoordinator.stop` ended the run before its last round."""


class RoundFailedError(RuntimeError):
    """A round got fewer than the strategy's ``min_clients`` results on every attempt."""

    def __init__(self, round: int, attempts: int, failures: Sequence[Failure]) -> None:
        self.round, self.attempts, self.failures = round, attempts, list(failures)
        reasons = "; ".join(f"{f.client_id} ({f.stage}): {f.reason}" for f in failures) or "no failures recorded"
        super().__init__(f"round {round}: too few results after {attempts} attempt(s); failures: {reasons}")


@dataclass
class CoordinatorConfig:
    """How the server runs rounds. Times are seconds."""

    num_rounds: int = field(metadata={"help": "federated rounds to run"})
    # The run's timing has one home, the [server] section (fedsplit.config.ServerConfig): its defaults here.
    round_timeout_s: float = field(default=_SERVER.round_timeout_s, metadata={"help": _help("round_timeout_s")})
    step_timeout_s: float = field(default=_SERVER.step_timeout_s, metadata={"help": _help("step_timeout_s")})
    join_timeout_s: float = field(default=_SERVER.join_timeout_s, metadata={"help": _help("join_timeout_s")})
    join_grace_s: float = field(default=_SERVER.join_grace_s, metadata={"help": _help("join_grace_s")})
    poll_s: float = field(default=0.5, metadata={"help": "the wait_s told to clients that must ask again"})
    max_round_retries: int = field(default=1, metadata={"help": "reruns of a round that got too few results"})
    ordered_steps: bool = field(default=True, metadata={"help": "round-robin trunk step order: reproducible runs"})
    max_examples_per_round: int = field(default=0, metadata={"help": "most examples an update may report "
                                                             "(local_steps x batch x grad_accum; 0: unchecked)"})
    max_examples_per_client: int = field(default=0, metadata={"help": "most examples a data report may claim "
                                                              "(0: unbounded; the strategy's max_share still caps)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "round checkpoints kept on disk (0: all)"})
    eval_per_s: float = field(default=4.0, metadata={"help": "evaluation FORWARDs a client may send per second "
                                                     "(token bucket; served between rounds only)"})
    eval_burst: int = field(default=64, metadata={"help": "evaluation FORWARDs a client may send at once"})
    update_bound_factor: float = field(default=10.0, metadata={"help": "refuse updates that moved an element more "
                                                               "than this x local_steps x lr (0: off)"})
    max_update_norm: float = field(default=0.0, metadata={"help": "refuse updates farther than this (L2) from the "
                                                          "global parts (0: off)"})
    contract_hash: str = field(default="", metadata={"help": "the run's data contract hash: a client's data "
                                                     "report must name it ('' = unchecked)"})

    def __post_init__(self) -> None:
        for name, least in (("num_rounds", 1), ("max_round_retries", 0),
                            ("max_examples_per_round", 0), ("max_examples_per_client", 0), ("eval_burst", 1),
                            ("keep_checkpoints", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"coordinator.{name}: expected an int >= {least}, got {value!r}")
        for name in ("round_timeout_s", "step_timeout_s", "join_timeout_s", "poll_s", "eval_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"coordinator.{name}: expected > 0, got {getattr(self, name)!r}")
        for name in ("update_bound_factor", "max_update_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"coordinator.{name}: expected a finite value >= 0, got {getattr(self, name)!r}")
        if not self.join_grace_s >= 0:
            raise ValueError(f"coordinator.join_grace_s: expected >= 0, got {self.join_grace_s!r}")
        if self.poll_s >= self.step_timeout_s:
            raise ValueError(
                f"coordinator.poll_s ({self.poll_s}) must be < step_timeout_s ({self.step_timeout_s}): "
                "a picked client collects its plan at its next poll"
            )


@dataclass
class RunResult:
    rounds_completed: int
    global_adapters: dict[str, Tensor]  # final head/tail adapters ("head/...", "tail/...")
    trunk_adapters: dict[str, Tensor]  # final trunk adapter (PEFT key names)
    history: list[dict[str, Any]]  # per completed round: round, clients, failures, metrics


@dataclass
class Session:
    """What the server knows about one client's connection(s)."""

    open: int = 0  # sessions handed out by handler_for and not yet disconnected
    in_flight: int = 0  # requests being served right now
    trunk_calls: int = 0  # training requests inside the TrunkServer
    last_seen: float = 0.0
    eval_tokens: float = -1.0  # evaluation FORWARDs it may still send now (token bucket; -1: full)
    eval_refill: float = 0.0  # when the bucket was last topped up

    def take_eval_token(self, burst: int, per_s: float, now: float) -> None:
        """Spend one evaluation request from this client's token bucket, or refuse it."""
        if self.eval_tokens < 0:
            self.eval_tokens, self.eval_refill = float(burst), now
        self.eval_tokens = min(burst, self.eval_tokens + (now - self.eval_refill) * per_s)
        self.eval_refill = now
        if self.eval_tokens < 1:
            raise ProtocolError(f"evaluation rate limit: {burst} requests, then {per_s:g} per second",
                                code=pb.RESOURCE_EXHAUSTED)
        self.eval_tokens -= 1

    @contextlib.contextmanager
    def request(self, lock: threading.Condition) -> Iterator[None]:
        """One request of this client in flight; the step clock (``last_seen``) ticks at both ends."""
        with lock:
            self.in_flight += 1
            self.last_seen = time.monotonic()
        try:
            yield
        finally:
            with lock:
                self.in_flight -= 1
                self.last_seen = time.monotonic()


@dataclass
class Participant:
    stage: ClientStage = ClientStage.PICKED
    steps: int = 0  # optimizer steps the trunk committed for it this round
    update: ClientUpdate | None = None

    def move(self, to: ClientStage) -> None:
        check_transition(CLIENT_NEXT, "participant", self.stage, to)
        self.stage = to


@dataclass
class OpenRound:
    number: int
    attempt: int
    local_steps: int
    lr: float
    settings: dict[str, str]
    adapters: list[pb.NamedTensor]  # the global adapters, encoded once per round
    participants: dict[str, Participant]
    turns: deque[str]  # whose trunk step is next (ordered_steps)
    deadline: float
    start_trunk: TrunkState  # restored if the round fails
    failures: list[Failure] = field(default_factory=list)

    def owing(self) -> list[str]:
        """Participants that still owe an update."""
        active = (ClientStage.PICKED, ClientStage.TRAINING)
        return [cid for cid, p in self.participants.items() if p.stage in active]

    def plan(self, first_step: int) -> pb.RoundPlan:
        """What a participant collects at its next JOIN_ROUND (``first_step``: its LR-schedule position)."""
        return pb.RoundPlan(round=self.number, local_steps=self.local_steps, lr=self.lr, adapters=self.adapters,
                            settings=self.settings, first_step=first_step)

    def step_taken(self, client_id: str) -> None:
        """Book one committed trunk step of ``client_id``; its next turn comes after the others'."""
        participant = self.participants[client_id]
        participant.steps += 1
        self.turns.remove(client_id)
        if participant.steps < self.local_steps:
            self.turns.append(client_id)

    def idle(self, sessions: Mapping[str, Session], now: float, limit_s: float) -> list[str]:
        """Participants that owe a request, have none in flight, and were silent for ``limit_s``."""
        return [cid for cid in self.owing() if sessions[cid].in_flight == 0 and now - sessions[cid].last_seen > limit_s]


@dataclass
class LobbyRule:
    """When a round may start, from who is in the lobby (times are ``time.monotonic()``).

    At once when every client is there; when at least ``least`` are, after ``grace_s`` more
    seconds of there being enough; after a restore, the clients the checkpointed round aggregated
    (``resumed``) are waited for until ``deadline`` before the grace rule applies. Past the
    deadline, enough clients start the round (without the resumed ones missing) and too few fail.
    """

    clients: int  # every client of the run
    least: int  # the strategy's min_clients
    grace_s: float
    deadline: float
    resumed: frozenset[str] = frozenset()
    enough_since: float | None = None

    def ready(self, now: float, lobby: AbstractSet[str]) -> bool:
        """Whether the round may start now; keeps the grace clock."""
        if len(lobby) == self.clients:
            return True
        if len(lobby) < self.least:
            self.enough_since = None
            return False
        if self.enough_since is None:
            self.enough_since = now
        if self.resumed <= lobby and now - self.enough_since >= self.grace_s:
            return True
        return now >= self.deadline

    def wake_at(self, lobby: AbstractSet[str]) -> float:
        """When :meth:`ready` may change if nobody joins or leaves."""
        if self.enough_since is None or not self.resumed <= lobby:
            return self.deadline
        return min(self.deadline, self.enough_since + self.grace_s)


def check_distance(
    tensors: Mapping[str, Tensor], current: Mapping[str, Tensor], *, local_steps: int, lr: float,
    factor: float, max_norm: float,
) -> None:
    """Refuse an update that moved farther than ``local_steps`` optimizer steps can move it.

    AdamW moves an element by at most about 3.2 x lr per step (default betas), so an element
    that moved more than ``factor x local_steps x lr`` was not trained; ``max_norm`` bounds the
    L2 distance as well. 0 turns a check off.
    """
    if factor:
        bound = factor * local_steps * lr
        moved, key = linf_distance(tensors, current)
        if not moved <= bound:
            raise ProtocolError(
                f"ClientUpdate.adapters[{key}]: an element moved {moved:.3g} from the global parts, more than "
                f"{bound:.3g} = {factor:g} x {local_steps} steps x lr {lr:g} (update_bound_factor)"
            )
    if max_norm:
        norm = l2_distance(tensors, current)
        if not norm <= max_norm:
            raise ProtocolError(f"ClientUpdate.adapters: distance {norm:.3g} to the global parts exceeds "
                                f"max_update_norm {max_norm:g}")


def check_plan(plan: RoundPlan, available: Sequence[str]) -> tuple[int, float]:
    """The strategy's plan must pick available clients and give ``local_steps`` >= 1 and ``lr`` > 0."""
    stray = sorted(set(plan.client_ids) - set(available))
    if stray or not plan.client_ids:
        raise StrategyError(
            f"round {plan.round}: expected the strategy to pick a non-empty subset of {list(available)}, "
            f"got {plan.client_ids}"
        )
    try:
        local_steps, lr = int(plan.settings["local_steps"]), float(plan.settings["lr"])
    except (KeyError, TypeError, ValueError) as exc:
        got = plan.settings
        raise StrategyError(f"round {plan.round}: expected local_steps and lr in the settings, got {got}") from exc
    if local_steps < 1 or not lr > 0:
        raise StrategyError(f"round {plan.round}: expected local_steps >= 1 and lr > 0, got {local_steps}, {lr}")
    return local_steps, lr


def plan_settings(plan: RoundPlan, local_steps: int, num_rounds: int) -> dict[str, str]:
    """The settings a participant receives: the strategy's, plus its LR schedule's horizon."""
    settings = {k: str(v) for k, v in plan.settings.items()}
    # The client's LR schedule spans all rounds (assumes the same local_steps every round).
    settings["total_steps"] = str(schedule_horizon(num_rounds, local_steps))
    settings["num_rounds"] = str(num_rounds)
    return settings


def check_step(
    r: OpenRound | None, stage: RoundStage, completed: int, client_id: str, kind: int, round: int
) -> tuple[OpenRound, Participant]:
    """A training request must come from a participant still training in the current round."""
    name = kind_name(kind)
    participant = r.participants.get(client_id) if r is not None else None
    if r is None or participant is None:
        raise ProtocolError(
            f"{name}: client {client_id} is not a participant of the current round "
            f"(round {completed + 1}, stage {stage.name})",
            code=pb.FAILED_PRECONDITION,
        )
    if stage is not RoundStage.TRAINING or participant.stage is ClientStage.FAILED:
        raise ProtocolError(f"{name}: round {r.number} is over for client {client_id}", code=pb.ABORTED)
    if round != r.number:
        raise ProtocolError(f"{name}: expected round {r.number}, got a frame for round {round}", code=_PRECONDITION)
    if participant.stage is not ClientStage.TRAINING:
        stage_now = participant.stage.value
        raise ProtocolError(f"{name}: client {client_id} is {stage_now}, not training", code=_PRECONDITION)
    if kind == pb.FORWARD and participant.steps >= r.local_steps:
        raise ProtocolError(f"{name}: client {client_id} already took its {r.local_steps} steps", code=_PRECONDITION)
    return r, participant


def check_update(
    client_id: str, r: OpenRound, participant: Participant, request: pb.ClientUpdate, tensors: dict[str, Tensor],
    current: Mapping[str, Tensor], config: CoordinatorConfig, *, weight: int,
) -> ClientUpdate:
    """An update is accepted only from a participant that took all its steps, within every bound.

    ``weight`` is the client's FedAvg weight (its data report, fixed at its first join).
    """
    if request.round != r.number:
        raise ProtocolError(
            f"ClientUpdate.round: expected {r.number} (the current round), got {request.round}", code=_PRECONDITION
        )
    if participant.stage is not ClientStage.TRAINING:
        raise ProtocolError(f"ClientUpdate: client {client_id} is {participant.stage.value}, not training",
                            code=_PRECONDITION)
    if participant.steps != r.local_steps:
        raise ProtocolError(
            f"ClientUpdate: expected {r.local_steps} optimizer steps in round {r.number}, "
            f"the trunk saw {participant.steps}",
            code=_PRECONDITION,
        )
    most = config.max_examples_per_round
    if not 1 <= request.num_examples <= (most or request.num_examples):
        raise ProtocolError(f"ClientUpdate.num_examples: expected 1..{most or 'any'}, got {request.num_examples}")
    check_compatible(current, tensors, "ClientUpdate.adapters", against="global adapters", error=ProtocolError)
    check_distance(tensors, current, local_steps=r.local_steps, lr=r.lr, factor=config.update_bound_factor,
                   max_norm=config.max_update_norm)
    return ClientUpdate(client_id, tensors, num_examples=weight, metrics=dict(request.metrics))


def check_checkpoint(
    checkpoint: Checkpoint, *, run_id: str, config_hash: str, num_rounds: int, global_adapters: Mapping[str, Tensor],
    clients: Sequence[str],
) -> None:
    """A checkpoint must belong to this run (id and configuration) and fit its parts and clients."""
    if (checkpoint.run_id, checkpoint.config_hash) != (run_id, config_hash):
        raise CheckpointError(
            f"checkpoint belongs to run {checkpoint.run_id!r} (config {checkpoint.config_hash[:12]!r}), "
            f"this coordinator runs {run_id!r} (config {config_hash[:12]!r})"
        )
    if not 0 <= checkpoint.round <= num_rounds:
        raise CheckpointError(f"checkpoint round: expected 0..{num_rounds}, got {checkpoint.round}")
    check_compatible(global_adapters, checkpoint.global_adapters, "checkpoint global adapters",
                     against="global adapters", error=CheckpointError)
    unknown = sorted(set(checkpoint.client_steps) - set(clients))
    if unknown:
        raise CheckpointError(f"checkpoint client_steps: clients {unknown} are not expected in this run")


def record_data_report(reports: dict[str, int], client_id: str, claimed: int, cap: int) -> int | None:
    """Fix a client's FedAvg weight at its first data report (bounded by ``cap`` > 0); later reports
    change nothing. Returns the weight when this report set it."""
    if claimed == 0 or client_id in reports:
        if claimed and claimed != reports[client_id]:
            log.warning("client %s: data report changed from %d to %d examples; the first stands",
                        client_id, reports[client_id], claimed)
        return None
    reports[client_id] = min(claimed, cap) if cap else claimed
    return reports[client_id]
