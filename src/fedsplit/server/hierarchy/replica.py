"""A sub-server of server-hierarchical training: one trunk replica (FL-GLM, arXiv 2406.14898, Sec. 3.3).

A sub-server holds a replica of the trunk (the base weights memory-mapped and shared with the other
sub-servers of the machine, :mod:`fedsplit.server.shared_weights`; its own LoRA adapter and AdamW
state) in a :class:`~fedsplit.server.trunk.TrunkServer`, and serves the root's relay sessions
(``root.<client id>``, signed with the root's identity key). It follows the root's control
messages (:mod:`.control`), one at a time, in order::

    STARTING --FORM--> SERVING --SYNC/GATHER--> REDUCING --done--> SERVING
        any --STOP, or a FORM without this rank (it was declared dead), or the root gone--> STOPPED

Before a collective it closes to new requests and waits until no request is in flight; it joins the
collective either way but reports "not ready" if a client is mid-step (FORWARD taken, OPTIMIZER_STEP
not yet), so no rank averages a half-updated state. Sessions: a new session of ``root.<c>``
supersedes the old one (the root reconnects only after giving up on it), so the partial step of
``root.<c>`` is aborted when a new session opens and when its last session ends.

The process around it (loading the trunk, the gRPC endpoint, the control-plane connection) is
:func:`fedsplit.recipes.subserver.run_subserver`, which ``fedsplit subserver`` runs.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
from collections.abc import Iterator

from google.protobuf.message import Message

from fedsplit.channel import Handler
from fedsplit.protocol import ProtocolError, pb
from fedsplit.server.hierarchy import RELAYED, HierarchyError
from fedsplit.server.hierarchy.collectives import (
    GroupSpec,
    ReduceStatus,
    SyncMode,
    TrainableState,
    gather_state,
    join_group,
    leave_group,
    reduce_state,
)
from fedsplit.server.hierarchy.control import ControlError, ControlMessage, ControlOp, ControlResult, SubControl
from fedsplit.server.stages import check_transition
from fedsplit.server.trunk import TrunkServer

log = logging.getLogger(__name__)


# -- quiescence: no request in flight while the replica takes part in a collective -----------------
class _Quiescence:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._mid_step: set[str] = set()
        self._closed = False

    @contextlib.contextmanager
    def request(self, client_id: str, kind: int, starts: bool, wait_s: float) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._closed, wait_s):
                raise ProtocolError(f"the replica was synchronizing for {wait_s} s", code=pb.ABORTED)
            self._in_flight += 1
            if starts:
                self._mid_step.add(client_id)
        done = False
        try:
            yield
            done = True
        finally:
            with self._cond:
                self._in_flight -= 1
                if kind == pb.OPTIMIZER_STEP and done:
                    self._mid_step.discard(client_id)
                self._cond.notify_all()

    def forget(self, client_id: str) -> None:
        with self._cond:
            self._mid_step.discard(client_id)

    @contextlib.contextmanager
    def closed(self, wait_s: float) -> Iterator[bool]:
        """Refuse new requests; yields whether the replica is quiet (nothing in flight, nobody mid-step)."""
        with self._cond:
            self._closed = True
            drained = self._cond.wait_for(lambda: self._in_flight == 0, wait_s)
            ready = drained and not self._mid_step
        try:
            yield ready
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


# -- the replica ----------------------------------------------------------------------------------
class SubServerStage(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    REDUCING = "reducing"
    STOPPED = "stopped"


_STAGE_NEXT: dict[SubServerStage, frozenset[SubServerStage]] = {
    SubServerStage.STARTING: frozenset({SubServerStage.SERVING, SubServerStage.STOPPED}),
    SubServerStage.SERVING: frozenset({SubServerStage.REDUCING, SubServerStage.STOPPED}),
    SubServerStage.REDUCING: frozenset({SubServerStage.SERVING, SubServerStage.STOPPED}),
    SubServerStage.STOPPED: frozenset(),
}


class SubServer:
    """One trunk replica: answers the root's relayed steps; joins the collectives it is told to."""

    def __init__(self, rank: int, server: TrunkServer, *, quiesce_timeout_s: float = 60.0) -> None:
        self.rank, self.server = rank, server
        self.state = TrainableState(server.trunk, server.params, server.optimizer)
        self.stage = SubServerStage.STARTING
        self.group: GroupSpec | None = None
        self.quiesce_timeout_s = quiesce_timeout_s
        self._steps_at_sync = server.steps_taken
        self._sessions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._quiet = _Quiescence()

    # -- relay sessions -------------------------------------------------------------------------
    def handler_for(self, client_id: str) -> Handler:
        """A new session of ``client_id`` supersedes its older ones: drop their partial step."""
        with self._lock:
            self._sessions[client_id] = self._sessions.get(client_id, 0) + 1
        self._abort(client_id)
        return functools.partial(self._handle, client_id)

    def on_disconnect(self, client_id: str) -> None:
        with self._lock:
            self._sessions[client_id] = max(0, self._sessions.get(client_id, 0) - 1)
            last = self._sessions[client_id] == 0
        if last:
            self._abort(client_id)

    def _abort(self, client_id: str) -> None:
        if self.server.abort(client_id):
            log.warning("sub-server %d: partial step of %s discarded", self.rank, client_id)
        self._quiet.forget(client_id)

    def _handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        if kind not in RELAYED:
            raise ProtocolError(f"a sub-server serves only the trunk step, not kind {kind}",
                                code=pb.FAILED_PRECONDITION)
        starts = kind == pb.FORWARD and bool(request.train)
        with self._quiet.request(client_id, kind, starts, self.quiesce_timeout_s):
            return self.server.handle(client_id, kind, round, step, request)

    # -- control messages -----------------------------------------------------------------------
    def run(self, control: SubControl, poll_s: float = 1.0) -> int:
        """Follow the root's messages until STOP (0) or until the root is gone (1)."""
        while self.stage is not SubServerStage.STOPPED:
            try:
                message = control.next(poll_s)
                if message is not None:
                    control.reply(self.apply(message))
            except (RuntimeError, ControlError) as exc:  # DistNetworkError: the root's store is gone
                log.error("sub-server %d: control plane lost (%s: %s); stopping", self.rank, type(exc).__name__, exc)
                self._stop_now()
                return 1
        return 0

    def apply(self, message: ControlMessage) -> ControlResult:
        """Carry out one message; any failure becomes a result with ``ok=False`` (the root decides)."""
        handlers = {ControlOp.FORM: self._form, ControlOp.SYNC: self._sync, ControlOp.GATHER: self._gather,
                    ControlOp.STOP: self._stop}
        try:
            return handlers[message.op](message)
        except Exception as exc:  # noqa: BLE001 - reported to the root as data
            log.exception("sub-server %d: %s failed", self.rank, message.op.value)
            return self._result(message, ok=False, error=f"{type(exc).__name__}: {exc}")

    def _result(self, message: ControlMessage, ok: bool, error: str = "", steps_since: int = 0,
                digest: str = "") -> ControlResult:
        return ControlResult(message.seq, self.rank, ok, error, steps_since, self.server.steps_taken, digest)

    def _form(self, message: ControlMessage) -> ControlResult:
        if self.rank not in message.members:  # the root declared this replica dead: its state is stale
            log.error("sub-server %d: not a member of generation %d; retiring", self.rank, message.generation)
            self._stop_now()
            return self._result(message, ok=False, error="retired: not a member")
        if message.layout != self.state.layout:
            raise HierarchyError(f"adapter layout {self.state.layout[:12]} differs from the root's "
                                 f"{message.layout[:12]} (the spec's [method] and [lora_trunk] must be the root's)")
        spec = GroupSpec(message.generation, message.host, message.port, message.members.index(self.rank) + 1,
                         len(message.members) + 1, message.backend, message.timeout_s)
        self.group = None
        join_group(spec)
        self.group = spec
        if self.stage is SubServerStage.STARTING:
            self._move(SubServerStage.SERVING)
        return self._result(message, ok=True)

    def _group_for(self, message: ControlMessage) -> GroupSpec:
        if self.group is None or self.group.generation != message.generation:
            have = None if self.group is None else self.group.generation
            raise HierarchyError(f"{message.op.value} for generation {message.generation}, this replica is in {have}")
        return self.group

    def _sync(self, message: ControlMessage) -> ControlResult:
        group = self._group_for(message)
        steps_since = self.server.steps_taken - self._steps_at_sync
        with self._quiet.closed(self.quiesce_timeout_s) as ready, self._reducing():
            outcome = reduce_state(self.state, group_rank=group.rank, mode=SyncMode(message.mode), ready=ready,
                                   steps_since=steps_since, steps_taken=self.server.steps_taken, device=group.device)
        if outcome.status not in (ReduceStatus.DONE, ReduceStatus.NOTHING_TO_DO):
            error = outcome.status.value + ("" if ready else ": a client of this replica was mid-step")
            return self._result(message, ok=False, error=error, steps_since=steps_since)
        self.server.steps_taken = self._steps_at_sync = outcome.steps_taken
        return self._result(message, ok=True, steps_since=steps_since, digest=self.state.digest())

    def _gather(self, message: ControlMessage) -> ControlResult:
        group = self._group_for(message)
        steps_since = self.server.steps_taken - self._steps_at_sync
        with self._quiet.closed(self.quiesce_timeout_s) as ready, self._reducing():
            gather_state(self.state, group_rank=group.rank, steps_taken=self.server.steps_taken,
                         steps_since=steps_since, device=group.device)
        return self._result(message, ok=ready, error="" if ready else "a client was mid-step", steps_since=steps_since)

    def _stop(self, message: ControlMessage) -> ControlResult:
        self._stop_now()
        return self._result(message, ok=True)

    def _stop_now(self) -> None:
        if self.stage is not SubServerStage.STOPPED:
            self._move(SubServerStage.STOPPED)
        leave_group()

    @contextlib.contextmanager
    def _reducing(self) -> Iterator[None]:
        self._move(SubServerStage.REDUCING)
        try:
            yield
        finally:
            self._move(SubServerStage.SERVING)

    def _move(self, to: SubServerStage) -> None:
        check_transition(_STAGE_NEXT, f"sub-server {self.rank}", self.stage, to, HierarchyError)
        self.stage = to

