"""The root's trunk in server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3): ReplicaRouter.

The coordinator sees a TrunkServer; behind it, K sub-servers each serve their own clients::

    handle(client, FORWARD | BACKWARD | OPTIMIZER_STEP)
        -> the gate (OPEN: relay; DRAINING / REDUCING: a new step waits)
        -> the client's sub-server, over the root's session root.<client>     (.relay)
        -> on a broken session: probe; if dead, move its clients and retry a FORWARD elsewhere

    a replica took sync_every steps, end_round, sync():
        gate OPEN -> DRAINING (started steps finish) -> REDUCING (FORM if needed, SYNC) -> OPEN

The collectives are in :mod:`.collectives`, the signed control messages in :mod:`.control`; see
:mod:`fedsplit.server.hierarchy` for the averaging rule and the failure model.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from google.protobuf.message import Message

from fedsplit.adapters import trainable_parameters
from fedsplit.channel import Channel, RemoteError
from fedsplit.config import HierarchyConfig
from fedsplit.protocol import ProtocolError, kind_name, pb
from fedsplit.security.errors import FrameError
from fedsplit.server.hierarchy import RELAYED, HierarchyError
from fedsplit.server.hierarchy.assignment import Assignment, Replica, ReplicaFailure, ReplicaStatus
from fedsplit.server.hierarchy.collectives import (
    GroupSpec,
    ReduceOutcome,
    ReduceStatus,
    ReplicaState,
    SyncMode,
    SyncReport,
    TrainableState,
    choose_backend,
    free_port,
    gather_state,
    in_group,
    join_group,
    leave_group,
    reduce_state,
)
from fedsplit.server.hierarchy.control import ControlMessage, ControlOp, ControlResult, RootControl
from fedsplit.server.hierarchy.relay import (
    RelayCredentials,
    RelayStats,
    ReplicaUnreachableError,
    listening,
    open_relay,
)
from fedsplit.server.stages import check_transition
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import build_optimizer

log = logging.getLogger(__name__)


class GateStage(enum.Enum):
    OPEN = "open"  # steps flow
    DRAINING = "draining"  # no new step starts; started ones finish
    REDUCING = "reducing"  # a collective runs; nothing is relayed


_GATE_NEXT: dict[GateStage, frozenset[GateStage]] = {
    GateStage.OPEN: frozenset({GateStage.DRAINING}),
    GateStage.DRAINING: frozenset({GateStage.REDUCING, GateStage.OPEN}),
    GateStage.REDUCING: frozenset({GateStage.OPEN}),
}


class ReplicaRouter:
    """The root's trunk: TrunkServer's surface (``handle``, ``abort``, ``end_round``, ``trunk``,
    ``optimizer``, ``params``, ``steps_taken``) over K remote replicas. See the module docstring.

    The root's own ``trunk`` / ``optimizer`` / ``params`` hold the state of the last sync; reading
    them does no work. The replicas are averaged into them at explicit points only: :meth:`sync`,
    :meth:`end_round` (the coordinator calls it after a round's updates are in, before it aggregates
    and checkpoints) and the worker's ``sync_every`` syncs. Changing them from outside
    (``restore_trunk``, which sets ``steps_taken`` last) makes the root's state authoritative: the
    next sync, or the next step, pushes it to the replicas first.
    """

    def __init__(
        self,
        trunk: Trunk,
        cfg: TrainConfig,
        total_steps: int,
        *,
        control: RootControl,
        credentials: RelayCredentials,
        clients: Sequence[str],
        config: HierarchyConfig,
        alive: Mapping[int, Callable[[], bool]] | None = None,
    ) -> None:
        if not clients or len(set(clients)) != len(clients):
            raise ValueError(f"clients: expected unique client ids, got {list(clients)}")
        self.cfg, self.total_steps, self.config = cfg, total_steps, config
        self.control, self.credentials, self.clients = control, credentials, tuple(clients)
        self._trunk = trunk
        self._params = trainable_parameters(trunk)
        self._optimizer = build_optimizer(self._params, cfg)  # holds state; the root never steps it
        self._state = TrainableState(trunk, self._params, self._optimizer)
        self._alive = dict(alive or {})
        self._assignment = Assignment()
        self.replicas = self._assignment.replicas  # rank -> replica
        self.assignment = self._assignment.clients  # client id -> rank
        self.failures: list[ReplicaFailure] = []
        self.reports: list[SyncReport] = []
        self.stats = RelayStats()
        self.generation = 0
        self._members: tuple[int, ...] = ()
        self._reform = True
        self._device = torch.device("cpu")  # where the collectives' buffers live (cuda with nccl)
        self._base_steps = 0  # steps_taken at the last sync
        self._relayed = 0  # optimizer steps relayed since then
        self._synced: tuple[torch.Tensor, int] | None = None  # (root state, steps) at the last sync
        self._exposed = True  # trunk/optimizer were handed out since the last check
        self._overridden = False  # the root's state was restored over steps the replicas took: push it
        self._channels: dict[str, tuple[int, Channel]] = {}
        self._mid_step: dict[str, int] = {}  # client -> replica holding its started step
        self._lost: dict[str, str] = {}  # client -> why its started step is gone
        self._in_flight = 0
        self._gate = GateStage.OPEN
        self._due: SyncMode | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._sync_lock = threading.RLock()
        self._worker: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> ReplicaRouter:
        """Wait for the sub-servers, assign the clients, form generation 1, push the root's state."""
        ranks = list(range(1, self.config.subservers + 1))
        found = self.control.await_announcements(ranks, self.config.startup_timeout_s,
                                                 exited=lambda r: r in self._alive and not self._alive[r]())
        for rank in ranks:
            if rank in found:
                self._assignment.add(Replica(rank, found[rank].address, found[rank].pid))
            else:
                self._assignment.add(Replica(rank, "", 0, ReplicaStatus.DEAD))
                self.failures.append(ReplicaFailure(rank, f"no announcement in {self.config.startup_timeout_s} s", {}))
        if not found:
            raise HierarchyError(f"no sub-server announced itself within {self.config.startup_timeout_s} s")
        self._assignment.spread(self.clients)
        report = self.sync(push=True)
        if not report.ok:
            raise HierarchyError(f"could not start the replicas: {report.error or report.status}")
        self._worker = threading.Thread(target=self._work, name="replica-router", daemon=True)
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop the sub-servers (STOP), leave the group, close the relay sessions. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()
        with self._sync_lock:
            self.control.post(ControlOp.STOP, self.generation, reason="run finished")
            leave_group()
        for _, channel in self._channels.values():
            channel.close()

    # -- the TrunkServer surface ----------------------------------------------------------------
    # The root's state as of the last sync; noted as handed out (the next step compares it, see _root_changed).
    @property
    def trunk(self) -> Trunk:
        self._exposed = True
        return self._trunk

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self._exposed = True
        return self._optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        self._exposed = True
        return self._params

    @property
    def steps_taken(self) -> int:
        return self._base_steps + self._relayed

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:  # restore_trunk: the root's state is authoritative again
        with self._cond:
            self._overridden = self._overridden or self._relayed > 0  # the replicas' unsynced steps are dropped
            self._base_steps, self._relayed, self._exposed = int(value), 0, True

    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        if kind not in RELAYED:
            raise ProtocolError(f"the trunk does not serve {kind_name(kind)}", code=pb.FAILED_PRECONDITION)
        starts = kind == pb.FORWARD and bool(request.train)
        rank = self._enter(client_id, kind, starts)
        done = False
        try:
            reply = self._relay_or_reroute(client_id, rank, kind, round, step, request, starts)
            done = True
            return reply
        finally:
            self._leave(client_id, kind, done, rank)

    def abort(self, client_id: str) -> bool:
        """Drop the client's started step: its session to the sub-server is closed, which aborts it there."""
        with self._cond:
            had = self._mid_step.pop(client_id, None) is not None
            held = self._channels.pop(client_id, None) if had else None
            self._cond.notify_all()
        if held is not None:
            held[1].close()
        return had

    def end_round(self, round: int) -> SyncReport | None:
        """The round-end sync point: average the replicas if they took steps since the last sync."""
        return self.sync() if self._relayed or self._reform else None

    # -- the gate: who may relay now ------------------------------------------------------------
    def _enter(self, client_id: str, kind: int, starts: bool) -> int:
        with self._cond:
            if client_id not in self.assignment:
                raise ProtocolError(f"client {client_id!r} has no sub-server", code=pb.PERMISSION_DENIED)
            if kind == pb.FORWARD:
                self._await_open(client_id)
                self._lost.pop(client_id, None)
            elif client_id in self._lost:
                raise ProtocolError(f"{kind_name(kind)}: {self._lost[client_id]}; step discarded", code=pb.ABORTED)
            if starts:
                self._mid_step[client_id] = self.assignment[client_id]
            self._in_flight += 1
            return self.assignment[client_id]

    def _await_open(self, client_id: str) -> None:
        """Wait for the gate (a FORWARD starts a step); first push the root's state if it changed."""
        limit = self.config.drain_timeout_s + 2 * self.config.sync_timeout_s
        deadline = time.monotonic() + limit
        if self._gate is GateStage.OPEN and self._idle() and self._root_changed():
            self._request_sync(SyncMode.PUSH)
        while self._gate is not GateStage.OPEN:
            if self._closed or not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                raise ProtocolError(f"client {client_id}: the sub-servers did not finish syncing in {limit} s",
                                    code=pb.ABORTED)

    def _leave(self, client_id: str, kind: int, done: bool, rank: int) -> None:
        with self._cond:
            self._in_flight -= 1
            if kind == pb.OPTIMIZER_STEP and done:  # committed on ``rank`` (an OPTIMIZER_STEP is never rerouted)
                self._mid_step.pop(client_id, None)
                self.replicas[rank].steps_since += 1
                self._relayed += 1
                if self.replicas[rank].steps_since >= self.config.sync_every:
                    self._request_sync(SyncMode.AVERAGE)
            self._cond.notify_all()

    def _request_sync(self, mode: SyncMode) -> None:
        """Close the gate now and let the worker sync (call with the lock held)."""
        if self._due is not SyncMode.PUSH:
            self._due = mode
        if self._gate is GateStage.OPEN:
            self._move(GateStage.DRAINING)
        self._cond.notify_all()

    def _idle(self) -> bool:
        return self._in_flight == 0 and not self._mid_step

    def _move(self, to: GateStage) -> None:
        check_transition(_GATE_NEXT, "gate", self._gate, to, HierarchyError)
        self._gate = to
        self._cond.notify_all()

    # -- relaying -------------------------------------------------------------------------------
    def _relay_or_reroute(
        self, client_id: str, rank: int, kind: int, round: int, step: int, request: Message, starts: bool
    ) -> Message:
        try:
            return self._relay(client_id, rank, kind, round, step, request)
        except (ConnectionError, FrameError) as exc:
            new_rank = self._replica_failed(rank, client_id, exc)
            if kind != pb.FORWARD:  # the graph / gradients of this step lived on that session
                with self._cond:
                    self._lost[client_id] = f"the session to sub-server {rank} failed"
                raise ProtocolError(f"{kind_name(kind)}: sub-server {rank} failed ({exc}); step discarded",
                                    code=pb.ABORTED) from exc
        with self._cond:
            if starts:
                self._mid_step[client_id] = new_rank
            self.stats.retried_forwards += 1
        try:  # nothing was committed by a FORWARD: take the same step on the client's sub-server now
            return self._relay(client_id, new_rank, kind, round, step, request)
        except (ConnectionError, FrameError) as exc:
            self._replica_failed(new_rank, client_id, exc)
            raise ProtocolError(f"FORWARD: sub-servers {rank} and {new_rank} failed ({exc})", code=pb.ABORTED) from exc

    def _relay(self, client_id: str, rank: int, kind: int, round: int, step: int, request: Message) -> Message:
        channel = self._channel(client_id, rank)
        started = time.perf_counter()
        try:
            return channel.call(kind, request, round=round, step=step)
        except RemoteError as exc:  # the sub-server refused the request: the client's error, passed on
            raise ProtocolError(f"sub-server {rank}: {exc.remote_message}", code=exc.code) from exc
        except ProtocolError as exc:  # a reply that does not parse or answers the wrong kind
            raise ProtocolError(f"sub-server {rank} answered badly: {exc}", code=pb.INTERNAL) from exc
        finally:
            with self._cond:
                self.stats.record(kind_name(kind), time.perf_counter() - started)

    def _channel(self, client_id: str, rank: int) -> Channel:
        with self._cond:
            held = self._channels.get(client_id)
            if held is not None and held[0] == rank:
                return held[1]
            replica = self.replicas[rank]
        if held is not None:
            held[1].close()
        channel = self._connect(client_id, replica)
        with self._cond:
            self._channels[client_id] = (rank, channel)
        return channel

    def _connect(self, client_id: str, replica: Replica) -> Channel:
        return open_relay(self.credentials, client_id, replica.rank, replica.address,
                          deadline_s=self.config.relay_deadline_s, connect_timeout_s=self.config.probe_timeout_s)

    # -- failures -------------------------------------------------------------------------------
    def _replica_failed(self, rank: int, client_id: str, exc: BaseException) -> int:
        """A relay to ``rank`` broke: probe it with a fresh session; mark it dead if that fails too.

        Returns the client's sub-server afterwards. The fresh session (if any) replaces the broken
        one; the sub-server aborts whatever the broken session had started.
        """
        with self._cond:
            held = self._channels.pop(client_id, None)
            replica = self.replicas[rank]
        if held is not None:
            held[1].close()
        if (replica.status is ReplicaStatus.LIVE and self._process_alive(rank)
                and listening(replica.address, self.config.probe_timeout_s)):
            try:
                self._channel(client_id, rank)
                log.warning("sub-server %d: session of %s broke (%s); reconnected", rank, client_id, exc)
                with self._cond:
                    self._mid_step.pop(client_id, None)
                return rank
            except ReplicaUnreachableError as probe:
                exc = probe
        with self._cond:
            self._mark_dead(rank, f"{type(exc).__name__}: {exc}")
            return self._require_assignment(client_id)

    def _process_alive(self, rank: int) -> bool:
        check = self._alive.get(rank)
        return check is None or check()

    def _poll_processes(self) -> None:
        """Mark replicas whose local process exited as dead (call with the lock held)."""
        for rank, replica in self.replicas.items():
            if replica.status is ReplicaStatus.LIVE and not self._process_alive(rank):
                self._mark_dead(rank, "its process exited")

    def _mark_dead(self, rank: int, reason: str) -> None:
        """Move the dead replica's clients to the survivors (call with the lock held)."""
        replica = self.replicas[rank]
        if replica.status is ReplicaStatus.DEAD:
            return
        for client in replica.clients:
            if self._mid_step.get(client) == rank:
                del self._mid_step[client]
                self._lost[client] = f"sub-server {rank} failed"
        moved = self._assignment.retire(rank)
        self._reform = True
        self.failures.append(ReplicaFailure(rank, reason, moved))
        log.error("sub-server %d is dead (%s); clients moved: %s", rank, reason, moved)
        self._cond.notify_all()

    def _live(self) -> list[int]:
        return self._assignment.live()

    def _require_assignment(self, client_id: str) -> int:
        if not self._live():
            raise ProtocolError("every sub-server has failed; the trunk is gone", code=pb.ABORTED)
        return self.assignment[client_id]

    # -- syncing --------------------------------------------------------------------------------
    def sync(self, push: bool = False) -> SyncReport:
        """Drain, then average the replicas' trainable state over every live rank.

        The root's state is pushed instead (PUSH) when ``push`` is set, when a step asked for it, or
        when the root's state was changed from outside since the last sync.
        """
        with self._sync_lock:
            started = time.monotonic()
            discarded = self._drain()
            with self._cond:
                self._poll_processes()
                push = push or self._due is SyncMode.PUSH or self._root_changed()
                mode = SyncMode.PUSH if push else SyncMode.AVERAGE
                self._due = None
                self._move(GateStage.REDUCING)
            try:
                report = self._reduce_with_reform(mode, discarded, started)
            finally:
                with self._cond:
                    self._move(GateStage.OPEN)
            self.reports.append(report)
            (log.info if report.ok else log.error)("sync: %s", report)
            return report

    def _drain(self) -> tuple[str, ...]:
        """Close the gate; wait for started steps; after drain_timeout_s discard the stragglers'."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        with self._cond:
            if self._gate is GateStage.OPEN:
                self._move(GateStage.DRAINING)
            while not self._idle() and time.monotonic() < deadline:
                self._cond.wait(timeout=0.2)
                self._poll_processes()
            stragglers = tuple(sorted(c for c in self._mid_step))
        for client in stragglers:
            self.abort(client)
            with self._cond:
                self._lost[client] = "the sub-servers had to synchronize"
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0)
        return stragglers

    def _reduce_with_reform(self, mode: SyncMode, discarded: tuple[str, ...], started: float) -> SyncReport:
        error = ""
        for _ in range(3):
            try:
                if self._reform or not in_group():  # a group left under us (one per process) forms again
                    self._form()
                outcome = self._reduce(mode)
                return self._report(True, mode, outcome.status.value, outcome, discarded, started)
            except (HierarchyError, RuntimeError) as exc:  # a dead peer, a timeout, a refused FORM
                error = f"{type(exc).__name__}: {exc}"
                log.warning("sync attempt failed: %s", error)
                self._reform = True
                if not self._live():
                    break
        return self._report(False, mode, "failed", None, discarded, started, error)

    def _report(self, ok: bool, mode: SyncMode, status: str, outcome: ReduceOutcome | None,
                discarded: tuple[str, ...], started: float, error: str = "") -> SyncReport:
        return SyncReport(ok, mode, self.generation, self._members, status,
                          outcome.total_steps if outcome else 0, self.steps_taken,
                          time.monotonic() - started, discarded, error)

    def _form(self) -> None:
        """Form a new generation among the live replicas; a member that does not join is dead."""
        with self._cond:
            members = tuple(self._live())
        if not members:
            raise HierarchyError("no live sub-server left to form a group with")
        cfg = self.config
        spec = GroupSpec(self.generation + 1, cfg.collective_host, free_port(cfg.collective_host), 0,
                         len(members) + 1, choose_backend(cfg.backend, len(members) + 1), cfg.sync_timeout_s)
        message = self.control.post(ControlOp.FORM, spec.generation, members=members, host=spec.host, port=spec.port,
                                    backend=spec.backend, timeout_s=spec.timeout_s, layout=self._state.layout)
        joined: BaseException | None = None
        try:
            join_group(spec)
        except RuntimeError as exc:
            joined = exc
        self._check_results(message, members, "FORM")
        if joined is not None:
            raise HierarchyError(f"generation {spec.generation} did not form: {joined}")
        self.generation, self._members, self._reform = spec.generation, members, False
        self._device = spec.device
        log.info("process group generation %d: root + sub-servers %s (%s, port %d)", spec.generation, members,
                 spec.backend, spec.port)

    def _reduce(self, mode: SyncMode) -> ReduceOutcome:
        message = self.control.post(ControlOp.SYNC, self.generation, mode=mode.value)
        steps = self.steps_taken
        try:
            outcome = reduce_state(self._state, group_rank=0, mode=mode, ready=True, steps_since=0,
                                   steps_taken=steps, device=self._device)
        finally:
            results = self._check_results(message, self._members, "SYNC")
        if outcome.status in (ReduceStatus.NOT_READY, ReduceStatus.LAYOUT_MISMATCH):
            raise HierarchyError(f"SYNC: {outcome.status.value}: {[r.error for r in results.values() if r.error]}")
        self._check_digests(results, outcome)
        with self._cond:
            self._settled(outcome, results)
        return outcome

    def _check_results(self, message: ControlMessage, members: Sequence[int], what: str) -> dict[int, ControlResult]:
        """Collect the members' results; a member without one is dead; a refusal is an error."""
        results = self.control.results(message.seq, members, self.config.sync_timeout_s)
        with self._cond:
            for rank in members:
                if rank not in results:
                    self._mark_dead(rank, f"no answer to {what} (generation {message.generation}) within "
                                          f"{self.config.sync_timeout_s} s")
        refused = {r: res.error for r, res in results.items() if not res.ok}
        if refused or len(results) < len(members):
            raise HierarchyError(f"{what} generation {message.generation}: refused by {refused}, "
                                 f"unanswered by {sorted(set(members) - set(results))}")
        return results

    def _check_digests(self, results: Mapping[int, ControlResult], outcome: ReduceOutcome) -> None:
        if outcome.status is not ReduceStatus.DONE:
            return
        mine = self._state.digest()
        differ = {r: res.digest[:12] for r, res in results.items() if res.digest != mine}
        if differ:
            raise HierarchyError(f"after the all-reduce the replicas differ from the root ({mine[:12]}): {differ}")

    def _settled(self, outcome: ReduceOutcome, results: Mapping[int, ControlResult]) -> None:
        """Book a successful sync (call with the lock held)."""
        for rank, result in results.items():
            if result.steps_since != self.replicas[rank].steps_since:
                log.warning("sub-server %d took %d steps since the last sync; the root relayed %d", rank,
                            result.steps_since, self.replicas[rank].steps_since)
        for replica in self.replicas.values():
            replica.steps_since = 0
        self._base_steps, self._relayed = outcome.steps_taken, 0
        self._synced = (self._state.flatten(), self._base_steps)
        self._exposed = self._overridden = False

    def _root_changed(self) -> bool:
        """Whether the root's state differs from what the replicas got at the last sync (lock held)."""
        if self._synced is None or self._overridden:
            return True
        if not self._exposed:
            return False
        flat, steps = self._synced
        self._exposed = False
        return steps != self._base_steps or not torch.equal(flat, self._state.flatten())

    def _work(self) -> None:
        """Run the syncs the gate asked for; notice local sub-server processes that exited."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._due is not None or self._closed, timeout=0.5)
                if self._closed:
                    return
                self._poll_processes()
                due = self._due
            if due is not None:
                try:
                    self.sync(push=due is SyncMode.PUSH)
                except Exception:  # noqa: BLE001 - the worker must outlive one bad sync; sync reopens the gate
                    log.exception("sync failed")

    # -- inspection -----------------------------------------------------------------------------
    def replica_states(self) -> dict[int, ReplicaState]:
        """Every rank's trainable state as it is now (0 = the root); drains, changes nothing."""
        with self._sync_lock:
            self._drain()
            with self._cond:
                self._move(GateStage.REDUCING)
            try:
                return self._gather()
            finally:
                with self._cond:
                    self._move(GateStage.OPEN)

    def _gather(self) -> dict[int, ReplicaState]:
        if self._reform or not in_group():
            self._form()
        message = self.control.post(ControlOp.GATHER, self.generation)
        try:
            flats = gather_state(self._state, group_rank=0, steps_taken=self._base_steps, steps_since=0,
                                 device=self._device)
        finally:
            self._check_results(message, self._members, "GATHER")
        assert flats is not None, "rank 0 receives the gather"
        ranks = (0, *self._members)
        return {r: self._state.unflatten(f[2:], int(f[0]), int(f[1])) for r, f in zip(ranks, flats, strict=True)}

    @property
    def live_replicas(self) -> list[int]:
        with self._cond:
            return self._live()


