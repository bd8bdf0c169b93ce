"""Asynchronous rounds: FedBuff (Nguyen et al. 2022, arXiv 2106.06639) over the FL-GLM split (arXiv 2406.14898).

``[federation] round_mode = "async"``: no lobby, no round barrier. Each client, on its own clock::

    client k                                     server (AsyncCoordinator)
    JOIN_ROUND  -------------------------------> a plan at once: the current global parts g_v
                                                 (version v = aggregations so far), round = v + 1,
                                                 local_steps, lr, first_step
    FORWARD / BACKWARD / OPTIMIZER_STEP x L  --> the trunk trains at every step, as in sync rounds
                                                 (a client whose parts went stale past max_staleness
                                                 is stopped at its next request: ABORTED)
    CLIENT_UPDATE(x_k) ------------------------> checked against g_{v_k} (keys, shapes, finite,
                                                 update_bound_factor, max_update_norm), staleness
                                                 tau = now - v_k <= max_staleness, folded into the
                                                 buffer (server/buffered.py) with the client's weight
    JOIN_ROUND (at once) ----------------------> the then-current parts; and so on

When ``buffer_size`` distinct clients are in the buffer, the request that completed it applies the
FedBuff step (:func:`~fedsplit.server.buffered.fedbuff_step`): that is one round. The coordinator's
own thread then logs ``round_end`` and writes the round's checkpoint (a checkpoint holds the trunk's
optimizer steps: a client's OPTIMIZER_STEP waits while it is taken, FORWARD/BACKWARD do not). After
``num_rounds`` rounds the updates still in flight are refused, the clients evaluate the final parts
(``eval.federated``: once, at the end; mid-run an evaluation would see each trunk step of the
others), and the run is DONE.

A client fails (its partial trunk step discarded, its update not counted) when it disconnects, joins
again before sending its update, has no request in flight for ``step_timeout_s`` while it owes one,
or its update is refused; it gets fresh parts at its next JOIN_ROUND. The run fails when no round
is aggregated for ``round_timeout_s`` (too few clients alive to fill a buffer).

What is deterministic: the aggregation of a given buffer (entries summed in client-id order, in
float64) and each client's data order. What is not: which updates land in which buffer and how
stale they are depends on timing, so runs are not reproducible bit for bit, and a resumed run goes
on from the last checkpointed round (updates in flight at the crash are lost).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import Message
from torch import Tensor

from fedsplit.metrics import MetricsWriter
from fedsplit.protocol import ProtocolError, decode_named, encode_named, kind_name, pb
from fedsplit.server.buffered import AsyncSettings, UpdateBuffer, VersionStore, fedavg_plan, fedbuff_step, stale_reason
from fedsplit.server.checkpoint import (
    Checkpoint,
    capture_rng,
    capture_trunk,
    save_checkpoint,
)
from fedsplit.server.driving import RunDriver
from fedsplit.server.evaluation import FederatedEvalConfig
from fedsplit.server.rounds import (
    ROUND_NEXT,
    CoordinatorConfig,
    RoundFailedError,
    RoundStage,
    RunResult,
    TrunkService,
    check_distance,
    check_plan,
    plan_settings,
)
from fedsplit.server.stages import check_transition
from fedsplit.strategy import AggregationError, ClientUpdate, Failure, Strategy
from fedsplit.strategy.aggregate import check_compatible

__all__ = ["AsyncCoordinator", "Assignment"]

log = logging.getLogger(__name__)
_PRECONDITION = pb.FAILED_PRECONDITION


@dataclass
class Assignment:
    """One client's training pass: the version of the global parts it started from, its trunk steps."""

    version: int
    steps: int = 0  # optimizer steps the trunk committed for it

    @property
    def round(self) -> int:
        return self.version + 1  # the round its update is for (the frames' round field)


@dataclass
class _Aggregated:
    """A round applied by a request thread, for the coordinator's thread to log and checkpoint."""

    record: dict[str, Any]
    audits: list[ClientUpdate] = field(default_factory=list)


class AsyncCoordinator(RunDriver):
    """The server's side of asynchronous rounds; the same surface as :class:`RoundCoordinator`
    (``handler_for``, ``on_disconnect``, ``run``/``start``/``wait``, ``stop``, ``restore``, ...)."""

    _thread_name = "async-coordinator"

    def __init__(
        self,
        trunk: TrunkService,
        strategy: Strategy,
        global_adapters: Mapping[str, Tensor],
        clients: Sequence[str],
        config: CoordinatorConfig,
        *,
        settings: AsyncSettings,
        metrics: MetricsWriter | None = None,
        checkpoint_dir: Path | str | None = None,
        run_id: str = "",
        config_hash: str = "",
        evaluation: FederatedEvalConfig | None = None,
    ) -> None:
        self._setup(trunk, strategy, global_adapters, clients, config, metrics=metrics,
                    checkpoint_dir=checkpoint_dir, run_id=run_id, config_hash=config_hash, evaluation=evaluation)
        if not 2 <= settings.buffer_size <= len(clients):
            raise ValueError(f"federation.buffer_size: expected 2..{len(clients)} (the clients), "
                             f"got {settings.buffer_size}")
        self._fedavg = fedavg_plan(strategy)  # its weight_fn and max_share weigh the buffer
        plan = strategy.configure_round(1, sorted(clients))  # the settings every pass trains with
        self._local_steps, self._lr = check_plan(plan, plan.client_ids)
        self._settings_map = plan_settings(plan, self._local_steps, config.num_rounds)
        self.settings = settings
        self._assignments: dict[str, Assignment] = {}
        self._buffer = UpdateBuffer(settings)
        self._versions = VersionStore()
        self._failures: list[Failure] = []  # since the last round
        self._aggregated: list[_Aggregated] = []  # rounds not yet logged and checkpointed
        self._last_round_at = 0.0
        self._stepping = 0  # OPTIMIZER_STEPs inside the trunk
        self._pausing = False  # a checkpoint is being taken: OPTIMIZER_STEPs wait

    # -- the coordinator's thread -----------------------------------------------------------------
    def run(self) -> RunResult:
        """Serve passes until ``num_rounds`` rounds are aggregated; returns when the run is DONE."""
        self._started = True
        try:
            self._begin()
            while self.completed_round < self.config.num_rounds or self._aggregated:
                self._write_rounds(self._wait_for_rounds())
            self._end()
        except BaseException as exc:
            self._fail(exc)
            raise
        return self.result()

    def _begin(self) -> None:
        with self._cond:
            self._versions.put(self.completed_round, self._global, encode_named(self._global))
            self._last_round_at = time.monotonic()
            if self.completed_round < self.config.num_rounds:
                self._move(RoundStage.TRAINING)
        s = self.settings
        self._log("async_start", round=self.completed_round + 1, buffer_size=s.buffer_size,
                  staleness_exponent=s.staleness_exponent, max_staleness=s.max_staleness, server_lr=s.server_lr,
                  max_share=self._fedavg.max_share, local_steps=self._local_steps, lr=self._lr)

    def _wait_for_rounds(self) -> list[_Aggregated]:
        """Block until request threads aggregated a round; fail idle clients; give up without progress."""
        cfg = self.config
        with self._cond:
            while not self._aggregated:
                self._check_not_stopping()
                if self._error is not None:
                    raise self._error
                now = time.monotonic()
                for cid, _ in self._idle(now):
                    self._fail_client(cid, f"no request for {cfg.step_timeout_s} s")
                if now - self._last_round_at > cfg.round_timeout_s:
                    raise RoundFailedError(self.completed_round + 1, 1, self._failures)
                self._cond.wait(timeout=cfg.step_timeout_s / 4)
            done, self._aggregated = self._aggregated, []
            return done

    def _idle(self, now: float) -> list[tuple[str, Assignment]]:
        limit = self.config.step_timeout_s
        return [(cid, a) for cid, a in self._assignments.items()
                if self._sessions[cid].in_flight == 0 and now - self._sessions[cid].last_seen > limit]

    def _write_rounds(self, rounds: list[_Aggregated]) -> None:
        for done in rounds:
            self.history.append(done.record)
            self._log("round_end", **done.record)
            self._evaluation.log_audit(done.record["round"], done.audits)
        if self.checkpoint_dir is not None:  # the latest round only, if several were aggregated meanwhile
            path = save_checkpoint(self.checkpoint_dir, self.checkpoint(), keep_last=self.config.keep_checkpoints)
            self._log("checkpoint", round=self.completed_round, path=str(path))

    def _end(self) -> None:
        """After the last round: wait out the trunk calls in flight, evaluate once if asked, DONE."""
        with self._cond:
            self._cond.wait_for(lambda: self._trunk_calls == 0)  # late steps are aborted as they return
            if self._evaluation.enabled and self._stage is RoundStage.AGGREGATING:  # not after a resumed last round
                self._move(RoundStage.EVALUATING)
                self._evaluation.run(self.completed_round, sorted(self.clients), self._global, self._sessions,
                                     self._check_not_stopping)
            if self._stage is not RoundStage.DONE:
                self._move(RoundStage.DONE)
        self._log("run_done", rounds=self.completed_round)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            for cid in list(self._assignments):
                self._fail_client(cid, f"the run ended: {type(exc).__name__}")
            if self._stage not in (RoundStage.DONE, RoundStage.FAILED):
                self._move(RoundStage.FAILED)
        self._log("run_failed", error=f"{type(exc).__name__}: {exc}")

    def checkpoint(self) -> Checkpoint:
        """The server state after the last round; OPTIMIZER_STEPs wait while the trunk is copied."""
        with self._cond:
            self._pausing = True
            try:
                self._cond.wait_for(lambda: self._stepping == 0)
                return Checkpoint(round=self.completed_round, run_id=self.run_id, config_hash=self.config_hash,
                                  global_adapters={k: v.clone() for k, v in self._global.items()},
                                  trunk=capture_trunk(self.trunk), client_steps=dict(self._client_steps),
                                  rng=capture_rng(),
                                  round_clients=tuple(self.history[-1]["clients"]) if self.history else ())
            finally:
                self._pausing = False
                self._cond.notify_all()

    # -- sessions (the plumbing and JOIN_ROUND's data report and end-of-run plans: RunDriver) ----
    def _session_lost(self, client_id: str) -> None:
        self._fail_client(client_id, "disconnected")  # its pass ends

    # -- JOIN_ROUND: a plan at once -----------------------------------------------------------------
    def _plan(self, client_id: str) -> pb.RoundPlan:
        if self._stage is not RoundStage.TRAINING or self._stopping:
            return pb.RoundPlan(round=self.completed_round + 1, wait_s=self.config.poll_s)
        if client_id in self._assignments:
            self._fail_client(client_id, "joined again before sending its update (it restarted)")
        version = self.completed_round
        self._assignments[client_id] = Assignment(version)
        self._sessions[client_id].last_seen = time.monotonic()  # the step clock starts now
        return pb.RoundPlan(round=version + 1, local_steps=self._local_steps, lr=self._lr,
                            adapters=self._versions.encoded(version), settings=self._settings_map,
                            first_step=self._client_steps[client_id])

    # -- FORWARD / BACKWARD / OPTIMIZER_STEP ------------------------------------------------------
    def _serve_trunk(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        """A training request of the client's current pass, delegated to the TrunkServer."""
        with self._cond:
            a = self._check_step(client_id, kind, round)
            if kind == pb.OPTIMIZER_STEP and self._pausing:  # a checkpoint is copying the trunk
                self._cond.wait_for(lambda: not self._pausing)
                a = self._check_step(client_id, kind, round)
            self._stepping += kind == pb.OPTIMIZER_STEP
            self._sessions[client_id].trunk_calls += 1
            self._trunk_calls += 1
        done = lost = False
        try:
            reply = self.trunk.handle(client_id, kind, round, step, request)
            done = True
        finally:
            with self._cond:
                self._stepping -= kind == pb.OPTIMIZER_STEP
                self._sessions[client_id].trunk_calls -= 1
                self._trunk_calls -= 1
                lost = self._assignments.get(client_id) is not a
                if lost:
                    self.trunk.abort(client_id)  # the call outlived the client's pass: drop its partial step
                elif done and kind == pb.OPTIMIZER_STEP:
                    a.steps += 1
                self._cond.notify_all()
        if lost:
            raise ProtocolError(f"{kind_name(kind)}: client {client_id} lost its pass of round {round}; step "
                                "discarded", code=pb.ABORTED)
        return reply

    def _check_step(self, client_id: str, kind: int, round: int) -> Assignment:
        """A training request must belong to the client's current pass, within its steps and fresh enough."""
        name = kind_name(kind)
        a = self._assignments.get(client_id)
        if self._stage is not RoundStage.TRAINING or a is None:
            raise ProtocolError(f"{name}: client {client_id} has no pass in progress (stage {self._stage.name}); "
                                "join again", code=pb.ABORTED)
        if round != a.round:
            raise ProtocolError(f"{name}: expected round {a.round}, got a frame for round {round}", code=_PRECONDITION)
        if kind == pb.FORWARD and a.steps >= self._local_steps:
            raise ProtocolError(f"{name}: client {client_id} already took its {self._local_steps} steps",
                                code=_PRECONDITION)
        if reason := stale_reason(self.completed_round - a.version, self.settings.max_staleness):
            self._fail_client(client_id, reason)
            raise ProtocolError(f"{name}: {reason}", code=pb.ABORTED)
        return a

    # -- CLIENT_UPDATE: into the buffer -----------------------------------------------------------
    def _receive_update(
        self, client_id: str, kind: int, round: int, step: int, request: pb.ClientUpdate
    ) -> pb.UpdateAck:
        tensors = decode_named(request.adapters, "ClientUpdate.adapters")  # outside the lock: the big part
        with self._cond:
            a = self._assignments.get(client_id)
            if self._stage is not RoundStage.TRAINING or a is None:
                raise ProtocolError(f"ClientUpdate: client {client_id} has no pass in progress (round "
                                    f"{request.round} sent; stage {self._stage.name})", code=pb.ABORTED)
            try:
                staleness, discount = self._buffer_update(client_id, a, request, tensors)
            except (ProtocolError, AggregationError) as exc:
                self._fail_client(client_id, f"update refused: {exc}")
                code = exc.code if isinstance(exc, ProtocolError) else pb.BAD_REQUEST
                raise ProtocolError(str(exc), code=code) from None
            del self._assignments[client_id]
            self._client_steps[client_id] += self._local_steps
            self._log("client_update", round=a.round, client=client_id, num_examples=int(request.num_examples),
                      staleness=staleness, discount=discount, metrics=dict(request.metrics))
            if self._buffer.ready():
                self._aggregate()
            self._versions.keep({self.completed_round, *(p.version for p in self._assignments.values())})
            self._cond.notify_all()
        return pb.UpdateAck(round=a.round, accepted=True)

    def _buffer_update(self, client_id: str, a: Assignment, request: pb.ClientUpdate,
                       tensors: dict[str, Tensor]) -> tuple[int, float]:
        """Check an update as the sync path does, against the parts it started from; fold it in."""
        cfg = self.config
        if request.round != a.round:
            raise ProtocolError(f"ClientUpdate.round: expected {a.round} (its pass), got {request.round}",
                                code=_PRECONDITION)
        if a.steps != self._local_steps:
            raise ProtocolError(f"ClientUpdate: expected {self._local_steps} optimizer steps, the trunk saw {a.steps}",
                                code=_PRECONDITION)
        most = cfg.max_examples_per_round
        if not 1 <= request.num_examples <= (most or request.num_examples):
            raise ProtocolError(f"ClientUpdate.num_examples: expected 1..{most or 'any'}, got {request.num_examples}")
        staleness = self.completed_round - a.version
        if reason := stale_reason(staleness, self.settings.max_staleness):
            raise ProtocolError(f"ClientUpdate: {reason}", code=pb.ABORTED)
        base = self._versions.tensors(a.version)
        check_compatible(base, tensors, "ClientUpdate.adapters", against="global adapters", error=ProtocolError)
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise ProtocolError("ClientUpdate.adapters: expected finite values, got NaN or Inf")
        if not all(math.isfinite(value) for value in request.metrics.values()):
            raise ProtocolError(f"ClientUpdate.metrics: expected finite values, got {dict(request.metrics)}")
        check_distance(tensors, base, local_steps=self._local_steps, lr=self._lr, factor=cfg.update_bound_factor,
                       max_norm=cfg.max_update_norm)
        examples = self._data_reports.get(client_id, int(request.num_examples))  # fixed at its first join
        weight = self._fedavg.weight_fn(ClientUpdate(client_id, tensors, examples, dict(request.metrics)))
        discount = self._buffer.add(client_id, tensors, base, staleness=staleness, weight=weight,
                                    num_examples=examples, metrics=dict(request.metrics))
        return staleness, discount

    def _aggregate(self) -> None:
        """One round: the FedBuff step over the buffer (lock held; the request that filled it runs it)."""
        number = self.completed_round + 1
        entries = self._buffer.drain()
        try:
            new, shares = fedbuff_step(self._global, entries, server_lr=self.settings.server_lr,
                                       max_share=self._fedavg.max_share)
        except AggregationError as exc:  # e.g. every weight 0: the run cannot go on as configured
            self._error = exc
            self._cond.notify_all()
            raise
        self._global, self.completed_round = new, number
        self._versions.put(number, new, encode_named(new))
        self._last_round_at = time.monotonic()
        staleness = [tau for entry in entries for tau in entry.staleness]
        metrics = _shared_metrics({e.client_id: e.metrics for e in entries}, shares)
        metrics.update(num_results=len(staleness), num_failures=len(self._failures),
                       mean_staleness=sum(staleness) / len(staleness), max_staleness=max(staleness))
        record = {"round": number, "attempt": 1, "clients": [e.client_id for e in entries],
                  "failures": [f.client_id for f in self._failures],
                  "num_examples": sum(e.num_examples for e in entries), "metrics": metrics,
                  "updates": {e.client_id: {"staleness": e.staleness, "share": shares[e.client_id]} for e in entries}}
        audits = [ClientUpdate(e.client_id, {}, e.num_examples, e.metrics) for e in entries]
        self._aggregated.append(_Aggregated(record, audits))
        self._failures = []
        log.info("round %d aggregated (async): %s", number, record["updates"])
        if number >= self.config.num_rounds:  # the last round: passes still in flight are over
            self._move(RoundStage.AGGREGATING)
            for cid in list(self._assignments):
                self._fail_client(cid, f"the run reached its last round ({number})")

    # -- failures and helpers ---------------------------------------------------------------------
    def _fail_client(self, client_id: str, reason: str) -> None:
        """End ``client_id``'s pass, if it has one (lock held): its partial trunk step is discarded."""
        a = self._assignments.pop(client_id, None)
        if a is None:
            return
        self._failures.append(Failure(client_id=client_id, reason=reason, stage="training"))
        discarded = False
        if self._sessions[client_id].trunk_calls == 0:  # else its call is aborted when it returns
            discarded = self.trunk.abort(client_id)
        log.warning("round %d (async): client %s failed: %s", a.round, client_id, reason)
        self._log("client_failed", round=a.round, client=client_id, stage="training", reason=reason,
                  partial_step_discarded=discarded)
        self._cond.notify_all()

    def _move(self, to: RoundStage) -> None:
        check_transition(ROUND_NEXT, "round", self._stage, to)
        log.info("async rounds (%d done): %s -> %s", self.completed_round, self._stage.name, to.name)
        self._stage = to
        self._cond.notify_all()


def _shared_metrics(metrics: Mapping[str, Mapping[str, float]], shares: Mapping[str, float]) -> dict[str, float]:
    """Per metric name, the mean over the buffered clients that report it, weighted by their shares."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for cid, share in shares.items():
        for name, value in metrics[cid].items():
            if share > 0:
                sums[name] = sums.get(name, 0.0) + share * float(value)
                totals[name] = totals.get(name, 0.0) + share
    return {name: sums[name] / totals[name] for name in sums}
