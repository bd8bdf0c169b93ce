"""A sub-server of server-hierarchical training: one trunk replica (FL-GLM, arXiv 2406.14898, Sec. 3.3).

    python -m fedsplit.server.subserver --root-config hierarchy.toml --rank K

A sub-server holds a replica of the trunk (the base weights memory-mapped and shared with the other
sub-servers of the machine, :mod:`fedsplit.server.shared_weights`; its own LoRA adapter and AdamW
state) in a :class:`~fedsplit.server.trunk.TrunkServer`, and serves the root's relay sessions
(``root.<client id>``, signed with the root's identity key) on its own gRPC endpoint, with the same
server identity key and TLS material as the root. It then follows the root's control messages (see
:mod:`fedsplit.server.hierarchical`), one at a time, in order::

    STARTING --FORM--> SERVING --SYNC/GATHER--> REDUCING --done--> SERVING
        any --STOP, or a FORM without this rank (it was declared dead), or the root gone--> STOPPED

Before a collective it closes to new requests and waits until no request is in flight; it joins the
collective either way but reports "not ready" if a client is mid-step (FORWARD taken, OPTIMIZER_STEP
not yet), so no rank averages a half-updated state. Sessions: a new session of ``root.<c>``
supersedes the old one (the root reconnects only after giving up on it), so the partial step of
``root.<c>`` is aborted when a new session opens and when its last session ends.

The root writes the spec file (:func:`write_spec`); ``run_subserver`` is the entry point the CLI wires.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import Message

from fedsplit.adapters import LoraSettings, add_lora
from fedsplit.channel import Handler
from fedsplit.config import ModelConfig
from fedsplit.protocol import ProtocolError, pb
from fedsplit.security.wire import check_identifier
from fedsplit.server.hierarchical import (
    RELAYED,
    ROOT_PREFIX,
    ControlError,
    ControlMessage,
    ControlOp,
    ControlResult,
    GroupSpec,
    HierarchyConfig,
    HierarchyError,
    ReduceStatus,
    SubControl,
    SyncMode,
    TrainableState,
    gather_state,
    join_group,
    leave_group,
    reduce_state,
)
from fedsplit.server.trunk import TrunkServer
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig

if TYPE_CHECKING:
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.transport.grpc_server import GrpcServer

log = logging.getLogger(__name__)

TRUNK_PART_INDEX = 1  # add_part_adapters seeds part i with seed + i: the trunk is part 1


# -- the spec file the root writes ----------------------------------------------------------------
@dataclass
class RunIdentity:
    run_id: str = field(metadata={"help": "the run the root serves"})
    config_hash: str = field(metadata={"help": "hex SHA-256 of the run configuration (handshake check)"})
    clients: list[str] = field(metadata={"help": "client ids; the root relays each as root.<id>"})
    total_steps: int = field(metadata={"help": "length of the trunk's LR schedule (all clients' steps)"})

    def __post_init__(self) -> None:
        check_identifier(self.run_id, "run.run_id", ValueError)
        if len(self.config_hash) != 64 or any(c not in "0123456789abcdef" for c in self.config_hash):
            raise ValueError(f"run.config_hash: expected 64 lowercase hex digits, got {self.config_hash!r}")
        if not self.clients or len(set(self.clients)) != len(self.clients):
            raise ValueError(f"run.clients: expected unique client ids, got {self.clients}")
        for client in self.clients:
            check_identifier(ROOT_PREFIX + client, "run.clients (as root.<id>)", ValueError)
        if self.total_steps < 1:
            raise ValueError(f"run.total_steps: expected >= 1, got {self.total_steps}")


@dataclass
class SecurityFiles:
    server_key: Path = field(metadata={"help": "server identity key (shared by the root and its sub-servers)"})
    root_public_key: Path = field(metadata={"help": "the root's own identity; admitted as root.<client>"})
    tls_key: Path | None = field(default=None, metadata={"help": "server TLS key (the root's)"})
    tls_cert: Path | None = field(default=None, metadata={"help": "server TLS certificate (the root's)"})
    ca_cert: Path | None = field(default=None, metadata={"help": "the CA that signed tls_cert (the root verifies with it)"})
    insecure: bool = field(default=False, metadata={"help": "no TLS (tests on loopback only)"})

    def __post_init__(self) -> None:
        if self.insecure == (self.tls_key is not None and self.tls_cert is not None and self.ca_cert is not None):
            raise ValueError("security: give tls_key, tls_cert and ca_cert, or insecure = true (exactly one)")


@dataclass
class SubServerSpec:
    """Everything a sub-server needs; the root writes it, ``--root-config`` names it."""

    run: RunIdentity
    security: SecurityFiles
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora_trunk: LoraSettings = field(default_factory=LoraSettings)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)


def write_spec(path: Path | str, spec: SubServerSpec) -> Path:
    from fedsplit.configio import dump_config

    path = Path(path)
    path.write_text(dump_config(spec))
    return path


def read_spec(path: Path | str) -> SubServerSpec:
    from fedsplit.configio import load_config

    return load_config(SubServerSpec, path)


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
            raise ProtocolError(f"a sub-server serves only the trunk step, not kind {kind}", code=pb.FAILED_PRECONDITION)
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

    def _result(self, message: ControlMessage, ok: bool, error: str = "", steps_since: int = 0, digest: str = "") -> ControlResult:
        return ControlResult(message.seq, self.rank, ok, error, steps_since, self.server.steps_taken, digest)

    def _form(self, message: ControlMessage) -> ControlResult:
        if self.rank not in message.members:  # the root declared this replica dead: its state is stale
            log.error("sub-server %d: not a member of generation %d; retiring", self.rank, message.generation)
            self._stop_now()
            return self._result(message, ok=False, error="retired: not a member")
        if message.layout != self.state.layout:
            raise HierarchyError(f"adapter layout {self.state.layout[:12]} differs from the root's {message.layout[:12]}")
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
        if to not in _STAGE_NEXT[self.stage]:
            raise HierarchyError(f"sub-server {self.rank}: {self.stage.name} -> {to.name} is not a valid transition")
        self.stage = to


# -- building and running one sub-server process ----------------------------------------------------
def build_replica_trunk(spec: SubServerSpec) -> Trunk:
    """The trunk (base weights shared unless ``hierarchy.shared_weights`` is off) with the seeded LoRA
    init every replica and the root share."""
    from fedsplit.server.shared_weights import SharedWeightsError, load_shared_trunk, resolve_weights_dir

    m = spec.model
    mappable = True
    try:
        resolve_weights_dir(m.name)
    except SharedWeightsError as exc:  # e.g. the in-memory tiny-* test models: nothing on disk to map
        mappable = False
        if spec.hierarchy.shared_weights:
            log.warning("shared weights off for %s: %s", m.name, exc)
    if spec.hierarchy.shared_weights and mappable:
        trunk = load_shared_trunk(m.name, m.head_layers, m.tail_layers)
    else:
        from fedsplit.models import load_model
        from fedsplit.split import split_model

        trunk = split_model(load_model(m.name)[0], m.head_layers, m.tail_layers).trunk
    add_lora(trunk, spec.lora_trunk, seed=spec.train.seed + TRUNK_PART_INDEX)
    return trunk


def _verifier(spec: SubServerSpec) -> HandshakeVerifier:
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.security.identity import load_private_key, load_public_key

    root_key = load_public_key(spec.security.root_public_key)
    admitted = {ROOT_PREFIX + client: root_key for client in spec.run.clients}
    return HandshakeVerifier(load_private_key(spec.security.server_key), admitted, [], pb.PROTOCOL_VERSION_CURRENT,
                             bytes.fromhex(spec.run.config_hash), run_id=spec.run.run_id)


def serve(replica: SubServer, spec: SubServerSpec, rank: int) -> GrpcServer:
    """Start the replica's gRPC endpoint (the root's TLS material and identity)."""
    from fedsplit.security.tls import load_server_tls
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import SessionFactory

    h, sec = spec.hierarchy, spec.security
    port = h.listen_port_base + rank if h.listen_port_base else 0
    factory = SessionFactory(_verifier(spec), replica.handler_for, spec.run.run_id)
    tls = None if sec.insecure else load_server_tls(sec.tls_key, sec.tls_cert)  # type: ignore[arg-type]
    return GrpcServer(f"{h.listen_host}:{port}", factory, tls=tls, insecure=sec.insecure, max_streams=h.max_streams,
                      idle_timeout_s=24 * 3600.0, on_disconnect=replica.on_disconnect).start()


def run_subserver(spec: SubServerSpec, rank: int) -> int:
    """Load the replica, serve it, announce it to the root, follow the root until STOP."""
    from fedsplit.security.identity import load_private_key, load_public_key

    h = spec.hierarchy
    if not 1 <= rank <= h.subservers:
        raise ValueError(f"rank: expected 1..{h.subservers}, got {rank}")
    torch.set_num_threads(h.threads_per_subserver())
    # Averaging K replicas that each took n steps moves the trunk about as far as n steps, where one
    # sequential trunk would have taken K n: the linear scaling rule gives each replica K x the LR.
    train = dataclasses.replace(spec.train, lr=spec.train.lr * h.subservers) if h.scale_lr else spec.train
    server = TrunkServer(build_replica_trunk(spec), train, spec.run.total_steps, lease_timeout_s=h.relay_deadline_s)
    replica = SubServer(rank, server, quiesce_timeout_s=h.sync_timeout_s)
    endpoint = serve(replica, spec, rank)
    try:
        control = SubControl.connect(h.control_host, h.control_port, spec.run.run_id, rank,
                                     load_private_key(spec.security.server_key),
                                     load_public_key(spec.security.root_public_key), h.startup_timeout_s)
        control.announce(f"{h.listen_host}:{endpoint.port}")
        log.info("sub-server %d (pid %d) serving on port %d with %d threads", rank, os.getpid(), endpoint.port,
                 torch.get_num_threads())
        return replica.run(control)
    finally:
        endpoint.stop(0)
        leave_group()


@dataclass
class LocalSubServer:
    """A sub-server process started on this machine by :func:`launch_local`."""

    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path | None

    def alive(self) -> bool:
        return self.process.poll() is None


def launch_local(spec_path: Path, ranks: Sequence[int], *, log_dir: Path | None = None,
                 python: str = sys.executable) -> dict[int, LocalSubServer]:
    """Start ``python -m fedsplit.server.subserver`` for each rank; output goes to ``log_dir/subserver-K.log``."""
    started: dict[int, LocalSubServer] = {}
    for rank in ranks:
        log_path = None if log_dir is None else Path(log_dir) / f"subserver-{rank}.log"
        out = subprocess.DEVNULL if log_path is None else log_path.open("wb")
        command = [python, "-m", "fedsplit.server.subserver", "--root-config", str(spec_path), "--rank", str(rank)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
        started[rank] = LocalSubServer(rank, process, log_path)
    return started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsplit subserver", description="one trunk replica of a hierarchical run")
    parser.add_argument("--root-config", type=Path, required=True, help="the spec file the root wrote")
    parser.add_argument("--rank", type=int, required=True, help="this sub-server's rank, 1..K")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s sub-server {args.rank} %(name)s: %(message)s")
    return run_subserver(read_spec(args.root_config), args.rank)


if __name__ == "__main__":
    sys.exit(main())
