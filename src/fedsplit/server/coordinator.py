"""The server's round loop of FL-GLM (arXiv 2406.14898, Alg. 1 and Sec. 3): rounds, clients, failures.

One round, stage by stage (:class:`RoundStage`, transitions checked)::

    WAITING_FOR_CLIENTS  clients send JOIN_ROUND and wait in the lobby (reply ``wait_s > 0``). The
                         round starts when every expected client is in the lobby, or when at least
                         the strategy's ``min_clients`` are and ``join_grace_s`` has passed since
                         there were enough.
    TRAINING             the strategy picks the participants. Each collects its RoundPlan at its
                         next JOIN_ROUND (global head/tail adapters, local_steps, lr, ``first_step``),
                         runs ``local_steps`` split steps through the trunk (the trunk's adapter is
                         updated at every step) and sends CLIENT_UPDATE. The round ends when every
                         participant has sent its update or failed, or after ``round_timeout_s``.
    AGGREGATING          the strategy averages exactly the updates that arrived; the failures
                         arrive as data, and so does its verdict that they are too few
                         (``TooFewResults``). The round is checkpointed.
    DONE / FAILED        after ``num_rounds`` rounds; or a round could not be completed.

Failures. A participant fails when its session ends (``on_disconnect``), when it sends JOIN_ROUND
again before its update (it restarted), when it has no request in flight for ``step_timeout_s``
while it owes one (evaluation requests do not count), when its update is refused, or at the round
deadline. Its partial trunk step is discarded (``TrunkServer.abort``); the trunk steps it completed
stay, as every split step updates the server's own adapter. It is readmitted at the next round (a
JOIN_ROUND mid-round gets ``wait_s``). A client may have several sessions at once (a reconnect
before the old stream is noticed dead): it counts as disconnected when its last session ends.

Too few results (< the strategy's ``min_clients``): the round leaves no trace (trunk adapter, optimizer and step
counters are restored to the round's start) and is retried, at most ``max_round_retries`` times;
then ``run`` raises :class:`RoundFailedError` naming every failure.

Stopping. :meth:`RoundCoordinator.stop` abandons the round in progress (no aggregate, no
checkpoint): the last checkpoint is that of the last completed round, and ``run`` / ``wait`` raise
:class:`RunStoppedError`.

Reproducibility. With ``ordered_steps`` the participants take their trunk steps in round-robin
order of their ids (the trunk is used by one client step at a time anyway), so a run with fixed
seeds is deterministic whatever the thread timing, and a run resumed from a checkpoint
(:meth:`RoundCoordinator.restore`) ends with the same adapters as an uninterrupted one. Who takes
part in a round is decided by who is in the lobby: after a restart the clients come back at their
own backoff pace, so the first resumed round waits (up to ``join_timeout_s``) for every client the
checkpointed round aggregated before the ``join_grace_s`` rule applies; otherwise a client still
reconnecting would miss that round and the resumed run would differ from the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message
from torch import Tensor

from fedsplit.metrics import MetricsWriter
from fedsplit.protocol import ProtocolError, decode_named, encode_named, kind_name, pb
from fedsplit.server.checkpoint import (
    Checkpoint,
    capture_rng,
    capture_trunk,
    restore_trunk,
    save_checkpoint,
)
from fedsplit.server.driving import RunDriver
from fedsplit.server.evaluation import FederatedEvalConfig
from fedsplit.server.rounds import (
    ROUND_NEXT,
    ClientStage,
    CoordinatorConfig,
    LobbyRule,
    OpenRound,
    Participant,
    RoundFailedError,
    RoundStage,
    RunResult,
    RunStoppedError,
    StageTransitionError,
    TrunkService,
    check_plan,
    check_step,
    check_update,
    plan_settings,
)
from fedsplit.server.stages import check_transition
from fedsplit.strategy import (
    AggregateResult,
    ClientUpdate,
    Failure,
    NotEnoughClientsError,
    Strategy,
    TooFewResults,
)

__all__ = ["ClientStage", "CoordinatorConfig", "RoundCoordinator", "RoundFailedError", "RoundStage", "RunResult",
           "RunStoppedError", "StageTransitionError", "TrunkService"]

log = logging.getLogger(__name__)

class RoundCoordinator(RunDriver):
    """Runs FL-GLM rounds: owns the trunk server, the global client adapters and the strategy.

    ``handler_for(client_id)`` is the per-session request handler the transport calls (from one
    thread per session); ``on_disconnect(client_id)`` is called when one of its sessions ends.
    ``run()`` drives the rounds in the calling thread; ``start()`` / ``wait()`` in a background one.
    """

    _thread_name = "round-coordinator"

    def __init__(
        self,
        trunk: TrunkService,
        strategy: Strategy,
        global_adapters: Mapping[str, Tensor],
        clients: Sequence[str],
        config: CoordinatorConfig,
        *,
        metrics: MetricsWriter | None = None,
        checkpoint_dir: Path | str | None = None,
        run_id: str = "",
        config_hash: str = "",
        evaluation: FederatedEvalConfig | None = None,
    ) -> None:
        self._setup(trunk, strategy, global_adapters, clients, config, metrics=metrics,
                    checkpoint_dir=checkpoint_dir, run_id=run_id, config_hash=config_hash, evaluation=evaluation)
        if strategy.min_clients > len(clients):
            raise ValueError(f"min_clients: expected <= {len(clients)} (the clients), got {strategy.min_clients}")
        self._round: OpenRound | None = None
        self._lobby: set[str] = set()
        self._resume_clients: frozenset[str] = frozenset()  # the first round after restore waits for them
        if hasattr(strategy, "attach"):  # secagg / ckks / hybrid: server/private_round.py serves its phases' requests
            strategy.attach(self._serve, lambda cid: self._sessions[cid].open > 0)

    # -- the round loop -----------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run every remaining round; returns when the last one is aggregated."""
        self._started = True
        try:
            if self.completed_round == 0 and self._evaluation.baseline:  # round 0: the starting parts (zero-shot)
                self._evaluate(0, self._wait_for_clients(1), [])
            while self.completed_round < self.config.num_rounds:
                self._run_round(self.completed_round + 1)
            self._finish()
        except BaseException as exc:
            self._fail(exc)
            raise
        return self.result()

    def _run_round(self, number: int) -> None:
        too_few: list[Failure] = []  # why the last attempt could not be aggregated
        for attempt in range(1, self.config.max_round_retries + 2):
            self._open_round(number, attempt)  # WAITING_FOR_CLIENTS -> TRAINING
            results, failures = self._collect_updates()  # TRAINING -> AGGREGATING
            self.trunk.end_round(number)  # hierarchical: average the replicas before aggregating and checkpointing
            aggregate = self.strategy.aggregate(number, results, failures, self._global)
            if isinstance(aggregate, AggregateResult):
                self._commit(aggregate, results, failures)  # -> EVALUATING, WAITING_FOR_CLIENTS or DONE
                self._evaluate(number, aggregate.clients, results)  # EVALUATING -> WAITING_FOR_CLIENTS or DONE
                return
            self._roll_back(aggregate)  # -> WAITING_FOR_CLIENTS, same round again
            too_few = aggregate.failures
        raise RoundFailedError(number, self.config.max_round_retries + 1, too_few)

    def _open_round(self, number: int, attempt: int) -> None:
        available = self._wait_for_clients(number)
        plan = self.strategy.configure_round(number, available)
        local_steps, lr = check_plan(plan, available)
        with self._cond:
            self._cond.wait_for(lambda: self._evaluation.in_flight == 0)  # no evaluation may see a training step
            now = time.monotonic()
            picked = sorted(plan.client_ids)
            self._round = OpenRound(
                number=number,
                attempt=attempt,
                local_steps=local_steps,
                lr=lr,
                settings=plan_settings(plan, local_steps, self.config.num_rounds),
                adapters=encode_named(self._global),
                participants={cid: Participant() for cid in picked},
                turns=deque(picked),
                deadline=now + self.config.round_timeout_s,
                start_trunk=capture_trunk(self.trunk),
            )
            for cid in picked:
                self._lobby.discard(cid)
                self._sessions[cid].last_seen = now  # the step clock starts now, not at its last poll
            self._move(RoundStage.TRAINING)
            for cid in picked:
                if self._sessions[cid].open == 0:  # left between the lobby snapshot and the pick
                    self._fail_participant(cid, "disconnected")
        self._log("round_start", round=number, attempt=attempt, clients=picked, local_steps=local_steps, lr=lr)

    def _wait_for_clients(self, number: int) -> list[str]:
        """Block until the round may start (:class:`LobbyRule`); the lobby's clients, sorted."""
        cfg = self.config
        rule = LobbyRule(len(self.clients), self.strategy.min_clients, cfg.join_grace_s,
                         time.monotonic() + cfg.join_timeout_s, self._resume_clients)
        self._resume_clients = frozenset()
        with self._cond:
            while True:
                self._check_not_stopping()
                now = time.monotonic()
                if rule.ready(now, self._lobby):
                    if missing := sorted(rule.resumed - self._lobby):
                        log.warning("round %d: resumed without %s (not back within %s s): the run will differ "
                                    "from an uninterrupted one", number, missing, cfg.join_timeout_s)
                    return sorted(self._lobby)
                if now >= rule.deadline:
                    raise NotEnoughClientsError(
                        f"round {number}: expected at least {rule.least} clients to join within "
                        f"{cfg.join_timeout_s} s, got {len(self._lobby)} ({', '.join(sorted(self._lobby)) or 'none'})"
                    )
                self._cond.wait(timeout=rule.wake_at(self._lobby) - now)

    def _collect_updates(self) -> tuple[list[ClientUpdate], list[Failure]]:
        """Wait until every participant has sent its update or failed; then quiesce the trunk."""
        with self._cond:
            r = self._current()
            while r.owing():
                self._check_not_stopping()
                now = time.monotonic()
                if now >= r.deadline:
                    for cid in r.owing():
                        self._fail_participant(cid, f"round timeout after {self.config.round_timeout_s} s")
                    break
                for cid in r.idle(self._sessions, now, self.config.step_timeout_s):
                    self._fail_participant(cid, f"no request for {self.config.step_timeout_s} s")
                self._cond.wait(timeout=min(r.deadline - now, self.config.step_timeout_s / 4))
            self._move(RoundStage.AGGREGATING)
            self._cond.wait_for(lambda: self._trunk_calls == 0)  # late steps are aborted as they return
            results = [p.update for _, p in sorted(r.participants.items()) if p.update is not None]
            return results, list(r.failures)

    def _commit(self, aggregate: AggregateResult, results: list[ClientUpdate], failures: list[Failure]) -> None:
        r = self._current()
        with self._cond:
            self._global = {k: v.detach().clone() for k, v in aggregate.tensors.items()}
            for update in results:
                self._client_steps[update.client_id] += r.local_steps
            self.completed_round = r.number
            last = r.number == self.config.num_rounds
            self._move(RoundStage.EVALUATING if self._evaluation.enabled else
                       RoundStage.DONE if last else RoundStage.WAITING_FOR_CLIENTS)
            self._round = None
        record = {"round": r.number, "attempt": r.attempt, "clients": aggregate.clients,
                  "failures": [f.client_id for f in failures], "num_examples": aggregate.num_examples,
                  "metrics": dict(aggregate.metrics)}
        self.history.append(record)
        self._log("round_end", **record)
        if self.checkpoint_dir is not None:
            path = save_checkpoint(self.checkpoint_dir, self.checkpoint(), keep_last=self.config.keep_checkpoints)
            self._log("checkpoint", round=r.number, path=str(path))

    def _roll_back(self, too_few: TooFewResults) -> None:
        """Undo a round that got too few results: restore the trunk; the same round runs again."""
        r = self._current()
        restore_trunk(self.trunk, r.start_trunk)
        with self._cond:
            self._move(RoundStage.WAITING_FOR_CLIENTS)
            self._round = None
        self._log("round_failed", round=r.number, attempt=r.attempt,
                  failures=[{"client": f.client_id, "stage": f.stage, "reason": f.reason} for f in too_few.failures])
        log.warning("%s; round %d runs again", too_few.reason, r.number)

    def _evaluate(self, number: int, clients: Sequence[str], results: list[ClientUpdate]) -> None:
        self._evaluation.log_audit(number, results)  # then federated evaluation, if on (server/evaluation.py)
        with self._cond:
            if number == 0:  # before round 1: WAITING_FOR_CLIENTS -> EVALUATING
                self._move(RoundStage.EVALUATING)
            if self._stage is RoundStage.EVALUATING:
                self._evaluation.run(number, clients, self._global, self._sessions, self._check_not_stopping)
                self._move(RoundStage.DONE if number == self.config.num_rounds else RoundStage.WAITING_FOR_CLIENTS)

    def _finish(self) -> None:
        with self._cond:
            if self._stage is not RoundStage.DONE:
                self._move(RoundStage.DONE)
        self._log("run_done", rounds=self.completed_round)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            if self._stage is RoundStage.TRAINING:  # drop the partial trunk steps of the abandoned round
                for cid in self._current().owing():
                    self._fail_participant(cid, f"the run ended: {type(exc).__name__}")
            if self._stage not in (RoundStage.DONE, RoundStage.FAILED):
                self._move(RoundStage.FAILED)
        self._log("run_failed", error=f"{type(exc).__name__}: {exc}")

    def checkpoint(self) -> Checkpoint:
        """The server state between rounds (the trunk is idle then)."""
        with self._cond:
            if self._stage in (RoundStage.TRAINING, RoundStage.AGGREGATING):
                raise RuntimeError(f"checkpoint: expected no round in progress, stage is {self._stage.name}")
            return Checkpoint(round=self.completed_round, run_id=self.run_id, config_hash=self.config_hash,
                              global_adapters=self.global_adapters, trunk=capture_trunk(self.trunk),
                              client_steps=dict(self._client_steps), rng=capture_rng(),
                              round_clients=tuple(self.history[-1]["clients"]) if self.history else ())

    def _restored(self, checkpoint: Checkpoint) -> None:
        self._resume_clients = frozenset(checkpoint.round_clients) & frozenset(self.clients)

    # -- sessions (the plumbing and JOIN_ROUND's data report and end-of-run plans: RunDriver) --
    def _session_lost(self, client_id: str) -> None:
        self._lobby.discard(client_id)  # its round participation ends
        r = self._round
        if r is not None and client_id in r.owing() and self._stage is RoundStage.TRAINING:
            self._fail_participant(client_id, "disconnected")

    # -- JOIN_ROUND -----------------------------------------------------------------------------
    def _plan(self, client_id: str) -> pb.RoundPlan:
        r = self._round
        participant = r.participants.get(client_id) if r is not None else None
        if self._stage is RoundStage.TRAINING and r is not None and participant is not None:
            if participant.stage is ClientStage.PICKED:
                participant.move(ClientStage.TRAINING)
                return r.plan(self._client_steps[client_id])
            if participant.stage is ClientStage.TRAINING:
                self._fail_participant(client_id, "joined again before sending its update (it restarted)")
        self._lobby.add(client_id)
        self._cond.notify_all()
        return pb.RoundPlan(round=self.completed_round + 1, wait_s=self.config.poll_s)

    # -- FORWARD / BACKWARD / OPTIMIZER_STEP ----------------------------------------------------
    def _serve_trunk(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        """A training request: checked against the round, in turn, then delegated to the TrunkServer."""
        with self._cond:
            self._await_turn(client_id, kind, round)
            self._sessions[client_id].trunk_calls += 1
            self._trunk_calls += 1
        done, lost = False, False
        try:
            reply = self.trunk.handle(client_id, kind, round, step, request)
            done = True
        finally:
            with self._cond:
                lost = self._end_trunk_call(client_id, kind, round, done)
        if lost:
            raise ProtocolError(f"{kind_name(kind)}: client {client_id} lost round {round}; step discarded",
                                code=pb.ABORTED)
        return reply

    def _await_turn(self, client_id: str, kind: int, round: int) -> None:
        """Check that ``client_id`` may take this step; in ordered mode wait until it is its turn."""
        while True:
            r, _ = check_step(self._round, self._stage, self.completed_round, client_id, kind, round)
            if not self.config.ordered_steps or kind != pb.FORWARD or r.turns[0] == client_id:
                return
            self._cond.wait()

    def _end_trunk_call(self, client_id: str, kind: int, round: int, done: bool) -> bool:
        """Book a finished trunk call; returns whether the client lost its round meanwhile."""
        self._sessions[client_id].trunk_calls -= 1
        self._trunk_calls -= 1
        self._cond.notify_all()
        r = self._round
        participant = r.participants.get(client_id) if r is not None and r.number == round else None
        training = self._stage is RoundStage.TRAINING
        if r is None or participant is None or not training or participant.stage is not ClientStage.TRAINING:
            self.trunk.abort(client_id)  # the call outlived the client's round: drop its partial step
            return True
        if done and kind == pb.OPTIMIZER_STEP:
            r.step_taken(client_id)
        return False

    # -- CLIENT_UPDATE --------------------------------------------------------------------------
    def _receive_update(
        self, client_id: str, kind: int, round: int, step: int, request: pb.ClientUpdate
    ) -> pb.UpdateAck:
        tensors = decode_named(request.adapters, "ClientUpdate.adapters")  # outside the lock: the big part
        with self._cond:
            r = self._round
            participant = r.participants.get(client_id) if r is not None else None
            if self._stage is not RoundStage.TRAINING or r is None or participant is None:
                current = r.number if r is not None else self.completed_round
                raise ProtocolError(
                    f"ClientUpdate: client {client_id} has no open round (round {request.round} sent; "
                    f"round {current} is {self._stage.value})",
                    code=pb.ABORTED if request.round == current else pb.FAILED_PRECONDITION,
                )
            try:  # a PrivateAggregator's reference: the plaintext tensors an update carries; else all (dict: a copy)
                reference = getattr(self.strategy, "reference", dict)(self._global)
                update = check_update(client_id, r, participant, request, tensors, reference, self.config,
                                      weight=self._data_reports.get(client_id, int(request.num_examples)))
            except ProtocolError as exc:
                if participant.stage in (ClientStage.PICKED, ClientStage.TRAINING):
                    self._fail_participant(client_id, f"update refused: {exc}")
                raise
            participant.update = update
            participant.move(ClientStage.SUBMITTED)
            self._cond.notify_all()
        self._log("client_update", round=r.number, client=client_id, num_examples=update.num_examples,
                  metrics=update.metrics)
        return pb.UpdateAck(round=r.number, accepted=True)

    # -- failures -------------------------------------------------------------------------------
    def _fail_participant(self, client_id: str, reason: str) -> None:
        """Drop ``client_id`` from the current round (call with the lock held)."""
        r = self._current()
        participant = r.participants[client_id]
        stage = participant.stage
        participant.move(ClientStage.FAILED)
        with contextlib.suppress(ValueError):
            r.turns.remove(client_id)
        r.failures.append(Failure(client_id=client_id, reason=reason, stage=stage.value))
        discarded = False
        if self._sessions[client_id].trunk_calls == 0:  # else its call is aborted when it returns
            discarded = self.trunk.abort(client_id)
        log.warning("round %d: client %s failed (%s): %s", r.number, client_id, stage.value, reason)
        self._log("client_failed", round=r.number, client=client_id, stage=stage.value, reason=reason,
                  partial_step_discarded=discarded)
        self._cond.notify_all()

    # -- helpers --------------------------------------------------------------------------------
    def _current(self) -> OpenRound:
        assert self._round is not None, "no round in progress"
        return self._round

    def _move(self, to: RoundStage) -> None:
        check_transition(ROUND_NEXT, "round", self._stage, to)
        # the round it concerns: the open one; else the next (a lobby that failed) or the last (the run is done)
        if self._round is not None:
            number = self._round.number
        else:
            number = self.completed_round + (to is RoundStage.FAILED)
        log.info("round %d: %s -> %s", number, self._stage.name, to.name)
        self._stage = to
        self._cond.notify_all()
