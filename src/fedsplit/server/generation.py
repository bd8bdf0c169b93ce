"""The trunk's side of split generation: one KV cache per (client, request) (FL-GLM, arXiv 2406.14898).

A client generating text keeps its head's and tail's caches; the server keeps the trunk's::

    GENERATE_PREFILL  h1 (B, T, H), mask (B, T), positions (B, T) -> cache opened -> GENERATE_RESULT h2 (B, T, H)
    GENERATE_STEP     h1 (B, 1, H), positions (B, 1)             -> cache + 1     -> GENERATE_RESULT h2 (B, 1, H)
    GENERATE_END                                                  -> cache dropped -> GENERATE_ENDED

The 2-D mask arrives once; the service extends its copy by one real token per step and rebuilds
the 4-D mask from it (:mod:`fedsplit.inference.cached`). Caches are bounded: open requests per
client and in all, rows per request, new tokens per request, cached positions, and idle time
(an idle cache is evicted). A request whose cache was evicted, or whose cache was computed with
trunk adapters that have since changed (a round ran), gets a clear FAILED_PRECONDITION error
naming what happened; the other requests go on. Served between rounds only when the round
coordinator holds it (:meth:`RoundCoordinator._serve_generation`): mid-round the trunk changes
at every step, and generation must not see (nor reveal) a half-trained trunk.

Client-batching for inference: decoding steps of several requests (of one or several clients)
that arrive while the trunk is busy share its next pass (:mod:`fedsplit.server.generation_batch`);
a step that finds the trunk idle runs at once. Prefills run one at a time.

A trunk with P-tuning v2 prefixes opens every cache with them (:func:`fedsplit.inference.cached.prefill_prefixes`):
its ``P`` positions count in the cache's length and in the model's context (a prompt must fit after
them), the positions on the wire stay un-offset. The prefixes train with the trunk, so the version
stamp (completed rounds, trunk steps) makes a cache stale when they change, and a new prefill reads them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf.message import Message

from fedsplit.inference.cached import PartCache, prefix_length, run_blocks_cached
from fedsplit.inference.generate import all_modules, context_length, eval_mode
from fedsplit.protocol import ProtocolError, decode_tensor, encode_tensor, kind_name, pb
from fedsplit.server.generation_batch import StepBatcher, StepItem, can_batch, combine, split_back
from fedsplit.server.trunk import decode_activation
from fedsplit.split.parts import Trunk

log = logging.getLogger(__name__)
_PRECONDITION = pb.FAILED_PRECONDITION
_EXHAUSTED = pb.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class GenerationLimits:
    """What one server's generation caches may hold."""

    max_sessions_per_client: int = field(default=4, metadata={"help": "open generation requests per client"})
    max_sessions: int = field(default=64, metadata={"help": "open generation requests in all"})
    max_batch: int = field(default=8, metadata={"help": "prompts (rows) per request"})
    max_new_tokens: int = field(default=1024, metadata={"help": "tokens one request may generate"})
    max_cached_length: int = field(default=0, metadata={"help": "positions per cache (0: the model's context)"})
    idle_s: float = field(default=300.0, metadata={"help": "a cache unused this long is evicted"})
    max_abs: float = field(default=65504.0, metadata={"help": "largest |hidden value| accepted"})

    def __post_init__(self) -> None:
        for name in ("max_sessions_per_client", "max_sessions", "max_batch", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.max_cached_length, int) or self.max_cached_length < 0:
            raise ValueError(f"max_cached_length: expected an integer >= 0, got {self.max_cached_length!r}")
        if not self.idle_s > 0 or not self.max_abs > 0:
            raise ValueError(f"idle_s and max_abs: expected > 0, got {self.idle_s!r} and {self.max_abs!r}")


@dataclass
class _Session:
    state: PartCache
    version: object  # the trunk adapters' version the cache was computed with
    max_new_tokens: int
    last_position: torch.Tensor  # (B,) the position of the last cached token of every row
    steps: int = 0
    last_used: float = 0.0


class GenerationService:
    """Answers GENERATE_PREFILL, GENERATE_STEP and GENERATE_END for any number of client sessions.

    ``version()`` names the trunk adapters' current state (the coordinator passes its completed
    round and the trunk's step count): a cache computed under another version is refused.
    """

    def __init__(self, trunk: Trunk, limits: GenerationLimits | None = None, *,
                 version: Callable[[], object] = lambda: 0, clock: Callable[[], float] = time.monotonic,
                 batch_steps: bool = True) -> None:
        self.trunk, self.limits = trunk, limits or GenerationLimits()
        self.version, self.clock = version, clock
        self.hidden_size = int(trunk.config.hidden_size)
        self.dtype = next(trunk.parameters()).dtype
        context = context_length(trunk.config) or 1 << 20
        self.max_length = min(self.limits.max_cached_length or context, context)
        self._sessions: OrderedDict[tuple[str, int], _Session] = OrderedDict()  # least recently used first
        self._gone: dict[str, deque[tuple[int, str]]] = {}  # why a client's recent requests were dropped
        self._lock = threading.Lock()  # the session table
        self._compute = threading.Lock()  # the trunk: one pass at a time
        self._batcher = StepBatcher(self._step_alone, self._step_many) if batch_steps and can_batch(trunk) else None
        self._modules = all_modules(trunk)  # listed again at every prefill; eval_mode walks this list at every step

    # -- dispatch -----------------------------------------------------------------------------
    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        handlers: dict[int, Callable[[str, Any], Message]] = {
            pb.GENERATE_PREFILL: self.prefill, pb.GENERATE_STEP: self.step, pb.GENERATE_END: self.end,
        }
        if kind not in handlers:
            raise ProtocolError(f"the generation service does not serve {kind_name(kind)}", code=_PRECONDITION)
        return handlers[kind](client_id, request)

    @property
    def open_requests(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- the three requests -------------------------------------------------------------------
    def prefill(self, client_id: str, request: pb.GeneratePrefill) -> pb.GenerateResult:
        hidden, mask, positions = self._decode_prefill(request)
        max_new = int(request.max_new_tokens)
        if not 1 <= max_new <= self.limits.max_new_tokens:
            raise ProtocolError(f"GeneratePrefill.max_new_tokens: expected 1..{self.limits.max_new_tokens}, "
                                f"got {max_new}", code=_EXHAUSTED)
        key = (client_id, int(request.request_id))
        session = _Session(PartCache(self.trunk), self.version(), max_new, positions[:, -1].clone())
        with self._lock:
            self._evict_idle()
            self._sessions.pop(key, None)  # the same id again: the client restarted that request
            self._admit(client_id)
            session.last_used = self.clock()
            self._sessions[key] = session
        try:
            output = self._run(session, hidden, mask, positions, prefill=True)  # (B, T, H)
        except BaseException:
            with self._lock:
                self._sessions.pop(key, None)
            raise
        return pb.GenerateResult(request_id=key[1], hidden=encode_tensor(output), cached_length=session.state.length)

    def step(self, client_id: str, request: pb.GenerateStep) -> pb.GenerateResult:
        key = (client_id, int(request.request_id))
        with self._lock:
            self._evict_idle()
            session = self._sessions.get(key)
            if session is None:
                raise ProtocolError(self._why_missing(key), code=_PRECONDITION)
            if session.version != self.version():
                self._drop(key, "the trunk adapters changed since its prefill (a training round ran)")
                raise ProtocolError(f"GenerateStep: request {key[1]}'s trunk cache no longer matches the trunk "
                                    "adapters (a training round ran since its prefill); send GENERATE_PREFILL again",
                                    code=_PRECONDITION)
            self._sessions.move_to_end(key)
        batch = session.state.batch
        hidden = decode_activation(request.hidden, "GenerateStep.hidden", dtype=self.dtype,
                                   shape=(batch, 1, self.hidden_size), max_abs=self.limits.max_abs)
        positions = decode_tensor(request.position_ids, "GenerateStep.position_ids", dtypes=(torch.int64,),
                                  shape=(batch, 1))
        if session.steps + 1 >= session.max_new_tokens:
            raise ProtocolError(f"GenerateStep: request {key[1]} asked for {session.max_new_tokens} new tokens "
                                "and has had them", code=_EXHAUSTED)
        if session.state.length + 1 > self.max_length:
            raise ProtocolError(f"GenerateStep: request {key[1]} would cache {session.state.length + 1} positions; "
                                f"the limit is {self.max_length}", code=_EXHAUSTED)
        if not torch.equal(positions[:, 0], session.last_position + 1):
            raise ProtocolError("GenerateStep.position_ids: expected the next position of every row "
                                f"{(session.last_position + 1).tolist()}, got {positions[:, 0].tolist()}")
        if self._batcher is None:
            output = self._run(session, hidden, session.state.step_mask(), positions)  # (B, 1, H)
        else:  # steps of other requests that arrive meanwhile share the next trunk pass
            output = self._batcher.submit(StepItem(session.state, hidden, positions))  # (B, 1, H)
            session.last_used = self.clock()
        session.steps += 1
        session.last_position = positions[:, 0].clone()
        return pb.GenerateResult(request_id=key[1], hidden=encode_tensor(output), cached_length=session.state.length)

    def end(self, client_id: str, request: pb.GenerateEnd) -> pb.GenerateEnded:
        with self._lock:
            found = self._sessions.pop((client_id, int(request.request_id)), None) is not None
        return pb.GenerateEnded(request_id=request.request_id, found=found)

    def drop_client(self, client_id: str) -> None:
        """Forget every cache of ``client_id`` (its last session ended)."""
        with self._lock:
            for key in [key for key in self._sessions if key[0] == client_id]:
                self._drop(key, "the client's session ended")

    # -- helpers ------------------------------------------------------------------------------
    def _run(self, session: _Session, hidden: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, *, prefill: bool = False) -> torch.Tensor:
        with self._compute, torch.no_grad():
            if prefill:  # a request starts: list the trunk's modules again (adapters may have come since)
                self._modules = all_modules(self.trunk)
            with eval_mode(*self._modules, walk=False):
                output = run_blocks_cached(self.trunk, hidden, mask, positions, session.state)
        session.last_used = self.clock()
        return output

    def _step_alone(self, item: StepItem) -> None:
        with self._compute, torch.no_grad(), eval_mode(*self._modules, walk=False):
            item.output = run_blocks_cached(self.trunk, item.hidden, item.state.step_mask(), item.positions,
                                            item.state)

    def _step_many(self, items: list[StepItem]) -> None:
        """Client-batching: the steps of several requests in one trunk pass (server/generation_batch.py)."""
        with self._compute, torch.no_grad(), eval_mode(*self._modules, walk=False):
            combined, hidden, positions = combine(self.trunk, items)  # (N, 1, H), (N, 1)
            output = run_blocks_cached(self.trunk, hidden, combined.step_mask(), positions, combined)  # (N, 1, H)
            split_back(self.trunk, combined, output, items)

    def _decode_prefill(self, request: pb.GeneratePrefill) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = decode_activation(request.hidden, "GeneratePrefill.hidden", dtype=self.dtype,
                                   shape=(None, None, self.hidden_size), max_abs=self.limits.max_abs)
        batch, seq, _ = hidden.shape
        if not 1 <= batch <= self.limits.max_batch:
            raise ProtocolError(f"GeneratePrefill.hidden: expected 1..{self.limits.max_batch} rows, got {batch}",
                                code=_EXHAUSTED)
        prefix = prefix_length(self.trunk)  # P-tuning v2: the P prefix positions count in the cache and context
        if not 1 <= seq < self.max_length - prefix:
            prefixed = f" after the trunk's {prefix} prefix positions" if prefix else ""
            raise ProtocolError(f"GeneratePrefill.hidden: a prompt of {seq} positions does not fit the trunk's "
                                f"cache of {self.max_length}{prefixed} (it needs room for one new token)",
                                code=_EXHAUSTED)
        mask = decode_tensor(request.attention_mask, "GeneratePrefill.attention_mask", dtypes=(torch.bool,),
                             shape=(batch, seq))
        positions = decode_tensor(request.position_ids, "GeneratePrefill.position_ids", dtypes=(torch.int64,),
                                  shape=(batch, seq))
        if not (0 <= int(positions.min()) and int(positions.max()) < self.max_length - prefix):
            raise ProtocolError(f"GeneratePrefill.position_ids: expected values in [0, {self.max_length - prefix}), "
                                f"got [{int(positions.min())}, {int(positions.max())}]")
        return hidden, mask, positions

    def _admit(self, client_id: str) -> None:
        """Room for one more request of ``client_id`` (call with the lock held)."""
        mine = sum(1 for cid, _ in self._sessions if cid == client_id)
        if mine >= self.limits.max_sessions_per_client:
            raise ProtocolError(f"GeneratePrefill: client {client_id} already has {mine} open generation "
                                "requests (the limit); send GENERATE_END for one first", code=_EXHAUSTED)
        if len(self._sessions) >= self.limits.max_sessions:
            raise ProtocolError(f"GeneratePrefill: the server holds {len(self._sessions)} open generation "
                                "requests (its limit); try again later", code=_EXHAUSTED)

    def _evict_idle(self) -> None:
        now = self.clock()
        for key, session in list(self._sessions.items()):
            if now - session.last_used > self.limits.idle_s:
                self._drop(key, f"evicted after {self.limits.idle_s:g} s idle")

    def _drop(self, key: tuple[str, int], reason: str) -> None:
        if self._sessions.pop(key, None) is not None:
            self._gone.setdefault(key[0], deque(maxlen=64)).append((key[1], reason))
            log.info("generation request %d of %s dropped: %s", key[1], key[0], reason)

    def _why_missing(self, key: tuple[str, int]) -> str:
        reason = next((why for rid, why in reversed(self._gone.get(key[0], ())) if rid == key[1]), None)
        if reason is None:
            return f"GenerateStep: request {key[1]} has no trunk cache (no GENERATE_PREFILL, or it ended)"
        return f"GenerateStep: request {key[1]}'s trunk cache is gone ({reason}); send GENERATE_PREFILL again"


def attach_generation(coordinator: Any, limits: GenerationLimits | None = None) -> GenerationService:
    """Serve generation from ``coordinator``'s trunk between rounds; a cache dies with its round.

    The trunk's version is (completed rounds, trunk steps): any training step after a prefill
    makes that request's cache stale.
    """
    holder = coordinator.trunk
    service = GenerationService(holder.trunk, limits,
                                version=lambda: (coordinator.completed_round, holder.steps_taken))
    coordinator.generation = service
    return service


def serving_handlers(service: GenerationService, evaluate: Any = None) -> Callable[[str], Callable[..., Message]]:
    """``handler_for(client_id)`` of a server started for serving only: GENERATE_* (and evaluation
    FORWARDs through ``evaluate.handle`` if given, e.g. a TrunkServer; no training request is served)."""

    def handler_for(client_id: str) -> Callable[..., Message]:
        def handle(kind: int, round: int, step: int, request: Message) -> Message:
            if kind == pb.FORWARD and evaluate is not None and not request.train:  # type: ignore[attr-defined]
                return evaluate.handle(client_id, kind, round, step, request)  # type: ignore[no-any-return]
            return service.handle(client_id, kind, round, step, request)

        return handle

    return handler_for
