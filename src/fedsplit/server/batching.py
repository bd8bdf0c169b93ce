"""Client batching on the server ("client-batch" mode; FL-GLM, arXiv 2406.14898, Sec. 3.3).

FL-GLM speeds up split training by letting the server run the trunk once for several clients:
their hidden states are concatenated into one batch. :class:`BatchingTrunkServer` does this for
clients served concurrently (one thread per request, as gRPC does) and offers the surface of
:class:`~fedsplit.server.trunk.TrunkServer` (``handle``, ``abort``, ``trunk``, ``optimizer``,
``params``, ``steps_taken``), so the round coordinator can hold either.

A *group step* is one trunk optimizer step shared by its members:

    COLLECTING --one trunk forward--> FORWARDED --one trunk backward--> BACKWARDED --one step--> STEPPED
         ^------------------ next micro-batch (grad_accum > 1) ------------------'

* Window. A group opens at its first training FORWARD and takes members until ``max_clients``
  have joined, or until ``window_s`` has passed *and* the trunk is free (only one group at a time
  owns the trunk gradients, as one client does in sequential mode; a group waiting for the trunk
  keeps taking members). Members of a later micro-batch of the same group step are all awaited.
* Exactness. Member ``i`` sends ``(B_i, T_i, H)``; each is right-padded to the group's longest
  ``T`` (mask False, position id 0: padding is appended after every real token, so neither causal
  nor sliding-window attention of a real token sees it), rows are concatenated, and each member
  gets back its own rows cut to its own ``T_i``: what it would get alone. The trunk gradient is
  the SUM of the members' gradients (each member's loss is its own mean).
* Clipping. The group step clips the joint gradient of every parameter it updates: the trunk's
  and every member's head and tail, ``sqrt(|g_trunk|^2 + sum_i |g_client_i|^2)``, exactly
  ``clip_grad_norm_`` over the union; all members get the same coefficient and apply it.
* Dropping. A member whose BACKWARD, or whose next FORWARD / OPTIMIZER_STEP, is more than
  ``member_timeout_s`` late, which sends a bad BACKWARD or OPTIMIZER_STEP, or which ``abort``
  names (disconnect) is dropped: its rows get zero gradient, what it already added to the trunk
  gradient is recomputed and subtracted before the step, so the step equals one without it. The
  others go on; the step counts as partial (``stats.partial_steps`` and a warning). Any later
  BACKWARD or OPTIMIZER_STEP of the dropped client is refused with ``ABORTED`` until its next
  FORWARD. A group whose members are all dropped ends without an optimizer step.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, TypeVar

import torch
from google.protobuf.message import Message

from fedsplit.protocol import ProtocolError, kind_name, pb
from fedsplit.protocol.precision import to_wire
from fedsplit.server.packing import Span, pack, scatter, unpack
from fedsplit.server.stages import check_transition
from fedsplit.server.trunk import TrunkServer, check_client_sq_norm, commit_step, decode_activation
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import autocast

log = logging.getLogger(__name__)


# -- the state machines ---------------------------------------------------------------------------
class GroupStage(enum.Enum):
    COLLECTING = "collecting"  # the FORWARDs of one micro-batch are gathering
    FORWARDED = "forwarded"  # one trunk forward served them; their BACKWARDs are due
    BACKWARDED = "backwarded"  # one trunk backward done; each member's next FORWARD or OPTIMIZER_STEP is due
    STEPPED = "stepped"  # one optimizer step done (none if every member was dropped); the trunk is free


class MemberStage(enum.Enum):
    READY = "ready"  # its FORWARD waits for the group forward
    SERVED = "served"  # has its trunk output; its BACKWARD is due
    GRADED = "graded"  # its BACKWARD waits for the group backward
    IDLE = "idle"  # micro-batch done; its next FORWARD or OPTIMIZER_STEP is due
    COMMITTED = "committed"  # its OPTIMIZER_STEP waits for the group step
    DROPPED = "dropped"  # late, bad or disconnected: removed from the step


_G, _M = GroupStage, MemberStage
_GROUP_MOVES: dict[GroupStage, frozenset[GroupStage]] = {
    _G.COLLECTING: frozenset({_G.FORWARDED, _G.STEPPED}),
    _G.FORWARDED: frozenset({_G.BACKWARDED, _G.STEPPED}),
    _G.BACKWARDED: frozenset({_G.COLLECTING, _G.STEPPED}),
    _G.STEPPED: frozenset(),
}
_MEMBER_MOVES: dict[MemberStage, frozenset[MemberStage]] = {
    _M.READY: frozenset({_M.SERVED, _M.DROPPED}),
    _M.SERVED: frozenset({_M.GRADED, _M.DROPPED}),
    _M.GRADED: frozenset({_M.IDLE, _M.DROPPED}),
    _M.IDLE: frozenset({_M.READY, _M.COMMITTED, _M.DROPPED}),
    _M.COMMITTED: frozenset({_M.DROPPED}),
    _M.DROPPED: frozenset(),
}
_T = TypeVar("_T")
_DUE = {_M.SERVED: "BACKWARD", _M.IDLE: "next FORWARD or OPTIMIZER_STEP"}  # stages with a deadline


def _dropped_error(kind: str, client_id: str, reason: str) -> ProtocolError:
    return ProtocolError(f"{kind}: client {client_id} was dropped from its group step: {reason}", code=pb.ABORTED)


def _given(value: _T | None) -> _T:
    """A member field its stage guarantees is set (inputs once READY, span once forwarded, grad once GRADED)."""
    assert value is not None
    return value


class _Inputs(NamedTuple):
    hidden: torch.Tensor  # (B, T, H)
    mask: torch.Tensor  # (B, T) bool
    positions: torch.Tensor  # (B, T) int64


class _Share(NamedTuple):
    """One micro-batch a member added to the trunk gradient, kept to subtract it if the member drops."""

    inputs: _Inputs
    grad: torch.Tensor  # (B, T, H) dL/d trunk output


@dataclass(eq=False)
class _Member:
    client_id: str
    stage: MemberStage = _M.IDLE
    inputs: _Inputs | None = None
    span: Span | None = None  # its rows in the last group forward
    output: torch.Tensor | None = None  # (B, T, H) its rows of the trunk output
    grad: torch.Tensor | None = None  # (B, T, H) from its BACKWARD
    input_grad: torch.Tensor | None = None  # (B, T, H) the reply to its BACKWARD
    client_sq_norm: float = 0.0
    due: float = math.inf  # monotonic deadline of its next request (SERVED, IDLE)
    shares: list[_Share] = field(default_factory=list)
    reason: str = ""

    def move(self, stage: MemberStage, due: float = math.inf) -> None:
        check_transition(_MEMBER_MOVES, f"member {self.client_id}", self.stage, stage)
        self.stage, self.due = stage, due


@dataclass(eq=False)
class _Group:
    number: int
    opened: float  # monotonic time of its first FORWARD
    members: dict[str, _Member] = field(default_factory=dict)
    stage: GroupStage = _G.COLLECTING
    busy: bool = False  # a leader runs its trunk computation outside the lock
    graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs leaf, outputs), each (N, T*, H)
    retract: list[_Share] = field(default_factory=list)  # shares of dropped members
    dropped: int = 0
    result: pb.OptimizerResult | None = None

    def move(self, stage: GroupStage) -> None:
        check_transition(_GROUP_MOVES, f"group {self.number}", self.stage, stage)
        self.stage = stage

    def live(self, *stages: MemberStage) -> list[_Member]:
        alive = [m for m in self.members.values() if m.stage is not _M.DROPPED]
        return [m for m in alive if m.stage in stages] if stages else alive


@dataclass
class BatchStats:
    """What the batching did; read it when no step is in flight."""

    forward_sizes: list[int] = field(default_factory=list)  # members in each batched trunk forward
    backwards: int = 0  # batched trunk backwards
    steps: int = 0  # optimizer steps taken (one per group step)
    partial_steps: int = 0  # steps taken after dropping >= 1 member
    dissolved: int = 0  # group steps that ended without a step: every member dropped
    dropped: int = 0  # members dropped (timeout, bad request, abort)


# -- the server -----------------------------------------------------------------------------------
class BatchingTrunkServer:
    """Answers FORWARD, BACKWARD and OPTIMIZER_STEP of concurrent clients with one trunk pass per group.

    ``total_steps`` counts trunk optimizer steps, i.e. group steps (the LR schedule's length), not
    client steps. Evaluation FORWARDs (``train=False``) run at once, alone and without a graph.
    """

    def __init__(
        self,
        trunk: Trunk,
        cfg: TrainConfig,
        total_steps: int,
        *,
        window_s: float = 0.02,
        max_clients: int = 8,
        member_timeout_s: float = 30.0,
        max_tokens: int = 1 << 20,
        max_abs: float = 65504.0,
        scale_lr: bool = True,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        if not (window_s >= 0 and member_timeout_s > 0):
            raise ValueError(f"expected window_s >= 0 and member_timeout_s > 0, got {window_s} and {member_timeout_s}")
        if not (isinstance(max_clients, int) and max_clients >= 1):
            raise ValueError(f"max_clients: expected an integer >= 1, got {max_clients!r}")
        # Composition: the sequential server's validation, parameters and optimizer, not its lease.
        self._core = TrunkServer(trunk, cfg, total_steps, max_tokens=max_tokens, max_abs=max_abs, wire_dtype=wire_dtype)
        self.trunk, self.cfg, self.total_steps = trunk, cfg, total_steps
        self.params, self.optimizer = self._core.params, self._core.optimizer
        self.steps_taken = 0
        self.window_s, self.max_clients, self.member_timeout_s = window_s, max_clients, member_timeout_s
        self.scale_lr = scale_lr  # trunk LR x members of the step (linear scaling rule)
        self.stats = BatchStats()
        self._cond = threading.Condition(threading.Lock())
        self._compute = threading.Lock()  # one trunk computation at a time (training or evaluation)
        self._queue: deque[_Group] = deque()  # groups collecting their first FORWARDs, oldest first
        self._active: _Group | None = None  # the group that owns the trunk gradients
        self._groups: dict[str, _Group] = {}  # live member -> its group
        self._dropped: dict[str, str] = {}  # dropped client -> why (until its next FORWARD)
        self._opened = 0

    # -- dispatch -----------------------------------------------------------------------------
    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        handlers: dict[int, Callable[[str, Any], Message]] = {
            pb.FORWARD: self.forward, pb.BACKWARD: self.backward, pb.OPTIMIZER_STEP: self.optimizer_step
        }
        if kind not in handlers:
            raise ProtocolError(f"the trunk does not serve {kind_name(kind)}", code=pb.FAILED_PRECONDITION)
        return handlers[kind](client_id, request)

    # -- the three requests (each in its client's thread) --------------------------------------
    def forward(self, client_id: str, request: pb.Forward) -> pb.ForwardResult:
        inputs = _Inputs(*self._core.decode_forward(request))  # (B, T, H), (B, T), (B, T)
        if not request.train:
            return pb.ForwardResult(hidden=self._core.encode_hidden(self._evaluate(inputs)))
        with self._cond:
            group, member = self._join(client_id, inputs)
            self._wait(group, member, lambda: member.stage is _M.SERVED)
            output = member.output
        assert output is not None
        return pb.ForwardResult(hidden=self._core.encode_hidden(output))  # (B, T, H) <- cut 2

    def backward(self, client_id: str, request: pb.Backward) -> pb.BackwardResult:
        with self._cond:
            group, member = self._member(client_id, "BACKWARD", _M.SERVED, "BACKWARD without a training FORWARD")
            assert member.output is not None
            dtype, shape = member.output.dtype, tuple(member.output.shape)
        try:  # outside the lock: the big part
            grad = decode_activation(request.grad, "Backward.grad", dtype=dtype, shape=shape,
                                     max_abs=self._core.max_abs, wire=self._core.wire_dtype)  # (B, T, H)
        except ProtocolError as exc:
            self._refuse(client_id, member, exc)
        with self._cond:
            self._still_live(member, "BACKWARD")
            member.grad = grad
            member.move(_M.GRADED)
            self._cond.notify_all()
            self._wait(group, member, lambda: member.stage is _M.IDLE)
            input_grad = member.input_grad
        assert input_grad is not None
        return pb.BackwardResult(grad=to_wire(input_grad, self._core.wire_dtype, "BackwardResult.grad"))  # dL/d input

    def optimizer_step(self, client_id: str, request: pb.OptimizerStep) -> pb.OptimizerResult:
        sq_norm = request.client_grad_sq_norm
        with self._cond:
            missing = "OPTIMIZER_STEP without accumulated gradients"
            group, member = self._member(client_id, "OPTIMIZER_STEP", _M.IDLE, missing)
        try:
            check_client_sq_norm(sq_norm)
        except ProtocolError as exc:
            self._refuse(client_id, member, exc)
        with self._cond:
            self._still_live(member, "OPTIMIZER_STEP")
            member.client_sq_norm = sq_norm
            member.move(_M.COMMITTED)
            self._cond.notify_all()
            self._wait(group, member, lambda: group.stage is _G.STEPPED)
            result = group.result
        assert result is not None
        return result

    def _evaluate(self, inputs: _Inputs) -> torch.Tensor:
        """Evaluation runs at once, alone: no graph, no group."""
        with self._compute, torch.no_grad(), autocast(self.cfg):
            return self.trunk(*inputs)  # (B, T, H)

    # -- joining and finding members (lock held) -----------------------------------------------
    def _join(self, client_id: str, inputs: _Inputs) -> tuple[_Group, _Member]:
        self._expire()
        self._dropped.pop(client_id, None)
        group = self._groups.get(client_id)
        if group is not None:  # the next micro-batch of its group step
            member = group.members[client_id]
            if member.stage is not _M.IDLE:
                raise ProtocolError(f"FORWARD while the previous one is {member.stage.value}",
                                    code=pb.FAILED_PRECONDITION)
            if group.stage is _G.BACKWARDED:
                group.move(_G.COLLECTING)
        else:
            group = self._open_group()
            member = group.members[client_id] = _Member(client_id)
            self._groups[client_id] = group
        member.inputs = inputs
        member.move(_M.READY)
        self._cond.notify_all()
        return group, member

    def _open_group(self) -> _Group:
        """The youngest group still taking members, or a new one."""
        if self._queue and len(self._queue[-1].members) < self.max_clients:
            return self._queue[-1]
        self._opened += 1
        self._queue.append(_Group(self._opened, time.monotonic()))
        return self._queue[-1]

    def _member(self, client_id: str, kind: str, stage: MemberStage, missing: str) -> tuple[_Group, _Member]:
        self._expire()
        group = self._groups.get(client_id)
        if group is None and client_id in self._dropped:
            raise _dropped_error(kind, client_id, self._dropped[client_id])
        member = group.members[client_id] if group is not None else None
        if group is None or member is None or member.stage is not stage:
            state = f" (it is {member.stage.value})" if member is not None else ""
            raise ProtocolError(missing + state, code=pb.FAILED_PRECONDITION)
        return group, member

    def _still_live(self, member: _Member, kind: str) -> None:
        self._expire()
        if member.stage is _M.DROPPED:
            raise _dropped_error(kind, member.client_id, member.reason)

    def _refuse(self, client_id: str, member: _Member, exc: ProtocolError) -> NoReturn:
        """A bad BACKWARD or OPTIMIZER_STEP: drop the member so the others need not wait for it."""
        with self._cond:
            group = self._groups.get(client_id)
            if group is not None and group.members.get(client_id) is member:
                self._drop(group, member, f"bad request: {exc}")
        raise exc

    # -- waiting and leading (lock held) -------------------------------------------------------
    def _wait(self, group: _Group, member: _Member, done: Callable[[], bool]) -> None:
        """Wait until ``done``; meanwhile any waiting member may lead its group's next computation."""
        while True:
            self._expire()
            if member.stage is _M.DROPPED:
                raise _dropped_error("request", member.client_id, member.reason)
            if done():
                return
            target = self._next_stage(group)
            if target is not None:
                self._lead(group, target)
            else:
                self._cond.wait(self._wait_s(group))

    def _next_stage(self, group: _Group) -> GroupStage | None:
        """The computation ``group`` is ready for, if any."""
        if group.busy:
            return None
        stages = {m.stage for m in group.live()}
        if group.stage is _G.COLLECTING:
            ready = self._may_start(group) if group is not self._active else _M.IDLE not in stages
            return _G.FORWARDED if ready else None
        if group.stage is _G.FORWARDED:
            return _G.BACKWARDED if _M.SERVED not in stages else None
        if group.stage is _G.BACKWARDED and stages == {_M.COMMITTED}:
            return _G.STEPPED
        return None

    def _may_start(self, group: _Group) -> bool:
        full = len(group.members) >= self.max_clients
        window_over = time.monotonic() >= group.opened + self.window_s
        return self._active is None and self._queue[0] is group and (full or window_over)

    def _wait_s(self, group: _Group) -> float | None:
        """Until the next deadline that may change something: a window end or a member's due time."""
        now = time.monotonic()
        deadlines = [m.due for m in self._active.live(*_DUE)] if self._active is not None else []
        if group is not self._active and group.opened + self.window_s > now:
            deadlines.append(group.opened + self.window_s)  # once over, the trunk's release notifies
        return max(1e-3, min(deadlines) - now) if deadlines else None

    def _lead(self, group: _Group, target: GroupStage) -> None:
        """Run the group's next trunk computation with the lock released: other clients keep being served."""
        phases: dict[GroupStage, tuple[Callable[[_Group], Any], Callable[[_Group, Any], Any], Callable[..., None]]]
        phases = {
            _G.FORWARDED: (self._begin_forward, self._run_forward, self._end_forward),
            _G.BACKWARDED: (self._begin_backward, self._run_backward, self._end_backward),
            _G.STEPPED: (self._begin_step, self._run_step, self._end_step),
        }
        begin, run, end = phases[target]
        work = begin(group)
        group.busy = True
        self._cond.release()
        try:
            with self._compute:
                result = run(group, work)
        except BaseException as exc:
            self._cond.acquire()
            group.busy = False
            self._fail(group, f"trunk {target.name} failed: {type(exc).__name__}: {exc}")
            raise
        self._cond.acquire()
        group.busy = False
        end(group, work, result)
        self._settle(group)
        self._cond.notify_all()

    # -- the three computations: begin (lock held), run (lock released), end (lock held) ---------
    def _begin_forward(self, group: _Group) -> list[_Member]:
        if group is not self._active:  # its first micro-batch: it takes the trunk
            self._queue.popleft()
            self._active = group
        batch = group.live(_M.READY)
        if batch:
            self.stats.forward_sizes.append(len(batch))
        return batch

    def _run_forward(self, group: _Group, batch: list[_Member]) -> tuple[list[torch.Tensor], list[Span]]:
        if not batch:
            return [], []
        (hidden, mask, positions), spans = pack([_given(m.inputs) for m in batch])  # (N, T*, H), (N, T*), (N, T*)
        inputs = hidden.requires_grad_()  # (N, T*, H) leaf: its gradient answers the BACKWARDs
        with torch.enable_grad(), autocast(self.cfg):
            outputs = self.trunk(inputs, mask, positions)  # (N, T*, H)
        group.graph = (inputs, outputs)
        return unpack(outputs.detach(), spans), spans  # (B_i, T_i, H) each

    def _end_forward(self, group: _Group, batch: list[_Member], result: tuple[list[torch.Tensor], list[Span]]) -> None:
        due = time.monotonic() + self.member_timeout_s
        for member, output, span in zip(batch, *result, strict=False):
            member.span = span  # also for a member dropped meanwhile: its rows stay in the graph
            if member.stage is _M.READY:
                member.output = output
                member.move(_M.SERVED, due)
        group.move(_G.FORWARDED)

    def _begin_backward(self, group: _Group) -> list[_Member]:
        return group.live(_M.GRADED)  # dropped members' rows keep zero gradient

    def _run_backward(self, group: _Group, graded: list[_Member]) -> list[torch.Tensor]:
        graph, group.graph = group.graph, None
        if graph is None or not graded:
            return []
        inputs, outputs = graph
        spans = [_given(m.span) for m in graded]
        outputs.backward(scatter([_given(m.grad) for m in graded], spans, outputs))  # (N, T*, H) -> trunk grads
        assert inputs.grad is not None
        return unpack(inputs.grad, spans)  # (B_i, T_i, H) each

    def _end_backward(self, group: _Group, graded: list[_Member], input_grads: list[torch.Tensor]) -> None:
        due = time.monotonic() + self.member_timeout_s
        for member, input_grad in zip(graded, input_grads, strict=False):
            assert member.inputs is not None and member.grad is not None
            share = _Share(member.inputs, member.grad)
            if member.stage is _M.DROPPED:  # dropped while its gradient was being used
                group.retract.append(share)
                continue
            member.shares.append(share)
            member.input_grad, member.output, member.inputs, member.grad = input_grad, None, None, None
            member.move(_M.IDLE, due)
        self.stats.backwards += 1 if graded else 0
        group.move(_G.BACKWARDED)

    def _begin_step(self, group: _Group) -> tuple[float, list[_Share], int]:
        committed = group.live(_M.COMMITTED)
        retract, group.retract = group.retract, []
        return sum(m.client_sq_norm for m in committed), retract, len(committed)

    def _run_step(self, group: _Group, work: tuple[float, list[_Share], int]) -> pb.OptimizerResult:
        client_sq_norm, retract, members = work
        for share in retract:
            self._retract(share)
        # One step stands for ``members`` sequential client steps: scale the trunk LR linearly.
        lr_scale = float(members) if self.scale_lr else 1.0
        return commit_step(self, client_sq_norm, lr_scale)  # the joint norm of all parameters the step updates

    def _retract(self, share: _Share) -> None:
        """Subtract one micro-batch of a dropped member from the trunk gradients (recomputed alone)."""
        with torch.enable_grad(), autocast(self.cfg):
            outputs = self.trunk(*share.inputs)  # (B, T, H)
        grads = torch.autograd.grad(outputs, self.params, share.grad, allow_unused=True)
        for param, grad in zip(self.params, grads, strict=False):
            if grad is not None and param.grad is not None:
                param.grad.sub_(grad)

    def _end_step(self, group: _Group, work: object, result: pb.OptimizerResult) -> None:
        group.result = result
        group.move(_G.STEPPED)
        self.stats.steps += 1
        if group.dropped:
            self.stats.partial_steps += 1
            log.warning(
                "group step %d (server step %d): partial, %d of %d members dropped",
                group.number,
                result.server_step,
                group.dropped,
                len(group.members),
            )
        self._close(group)

    # -- dropping, dissolving, closing (lock held) ---------------------------------------------
    def _expire(self) -> None:
        """Drop every member of the active group whose next request is overdue."""
        group, now = self._active, time.monotonic()
        if group is None:
            return
        for member in group.live(*_DUE):
            if now >= member.due:
                self._drop(
                    group, member, f"no {_DUE[member.stage]} within member_timeout_s={self.member_timeout_s:g} s"
                )

    def _drop(self, group: _Group, member: _Member, reason: str) -> None:
        member.move(_M.DROPPED)
        member.reason = reason
        group.retract.extend(member.shares)
        member.shares = []
        group.dropped += 1
        self.stats.dropped += 1
        self._groups.pop(member.client_id, None)
        self._dropped[member.client_id] = reason
        log.warning("group step %d: client %s dropped: %s", group.number, member.client_id, reason)
        self._settle(group)
        self._cond.notify_all()

    def _fail(self, group: _Group, reason: str) -> None:
        """A trunk computation raised: nobody's step in this group can complete."""
        for member in group.live():
            self._drop(group, member, reason)
        self._settle(group)
        self._cond.notify_all()

    def _settle(self, group: _Group) -> None:
        """End an active group that has no live member left: no step; its gradients are discarded."""
        if group is not self._active or group.busy or group.stage is _G.STEPPED or group.live():
            return
        group.graph = None
        self.optimizer.zero_grad(set_to_none=True)
        group.move(_G.STEPPED)
        self.stats.dissolved += 1
        log.warning("group step %d: every member dropped; no optimizer step", group.number)
        self._close(group)

    def _close(self, group: _Group) -> None:
        for client_id in group.members:
            if self._groups.get(client_id) is group:
                del self._groups[client_id]
        self._active = None
        self._cond.notify_all()

    def end_round(self, round: int) -> None:
        """One trunk: nothing to reconcile at round end."""

    def abort(self, client_id: str) -> bool:
        """Drop a client's part of its group step at once (disconnect). Returns whether it had one."""
        with self._cond:
            group = self._groups.get(client_id)
            if group is None:
                return False
            member = group.members[client_id]
            if group is not self._active:  # still collecting: leave without a trace
                self._leave_queue(group, member)
            else:
                self._drop(group, member, "aborted (client disconnected or left the round)")
            return True

    def _leave_queue(self, group: _Group, member: _Member) -> None:
        member.move(_M.DROPPED)
        member.reason = "aborted before its group started"
        del group.members[member.client_id], self._groups[member.client_id]
        if not group.members:
            self._queue.remove(group)
        self._cond.notify_all()
