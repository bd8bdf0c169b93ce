"""Server-hierarchical split training: K trunk replicas behind one root (FL-GLM, arXiv 2406.14898, Sec. 3.3).

FL-GLM's "server-hierarchical" mode serves the clients from several sub-servers, each with its own
copy of the trunk, and averages the sub-servers' trunks. Here:

    clients --gRPC--> root: RoundCoordinator -> ReplicaRouter --gRPC, one session per client--> sub-server k
                                                      |                              (TrunkServer replica)
                                                      '--- torch.distributed all_reduce ---' ranks 0 (root), 1..K

* Relay. The root keeps the client sessions and the round loop. Its trunk object is a
  :class:`ReplicaRouter`: it gives every client a sub-server (balanced, deterministic by client id)
  and relays the client's FORWARD / BACKWARD / OPTIMIZER_STEP over a session the root opens with
  ``connect_grpc`` as ``root.<client id>``, signed with the root's own identity key. Each message is
  opened on the root (the client's keys) and sealed again (the sub-server's keys).
* Averaging. Ranks 0 (the root, weight 0) and 1..K form a process group (``init_method=tcp://``,
  gloo on CPU, nccl with one GPU per rank). When any sub-server has taken ``sync_every`` optimizer
  steps since the last sync, and at round end (``end_round``; with today's coordinator, reading the
  root's ``trunk`` / ``optimizer`` for the next round's capture or a checkpoint is that sync point),
  the root closes its gate to new steps, lets the started ones finish, and every rank all-reduces
  its trunk LoRA weights and AdamW moments:

      x <- sum_k (n_k / N) x_k        n_k = steps replica k took since the last sync, N = sum_k n_k

  for the weights, ``exp_avg``, ``exp_avg_sq`` and AdamW's per-parameter ``step``, so a replica that
  did nothing since the last sync weighs nothing, and ``step`` becomes the number of moment updates
  the averaged moments carry (bias correction stays consistent). The LR-schedule position
  (``steps_taken``) becomes the root's count of all client steps the trunk has served, the same on
  every rank. After the sync every rank (the root too) holds the same bytes; the root checks it
  with the replicas' digests. A ``PUSH`` sync (root weight 1, replicas 0) copies the root's state to
  the replicas: at start, and whenever the root's state was changed from outside (checkpoint
  restore, a failed round's roll-back).
* Control plane. The root drives every collective with signed messages in a ``TCPStore`` it
  hosts (FORM a group generation, SYNC, GATHER, STOP); each sub-server answers with a signed
  result. A separate channel, not the relay sessions, because a sub-server must join every
  collective even when it has no client session at all, and the wire protocol has no message
  kind for it (see the proposed SYNC / SYNC_RESULT kinds in the report). Messages are Ed25519-signed
  (root identity / server identity) and bound to the run id, a fresh root nonce and a sequence
  number: a party on the network can read or delete them, not forge or replay them.
* Failures. A sub-server is dead when its process exits (local launches), a relay to it fails and
  a fresh session cannot be opened, or it misses a collective. Its clients move to the survivors
  (fewest clients first). A FORWARD is retried on the new sub-server (nothing was committed); a
  BACKWARD / OPTIMIZER_STEP fails with ABORTED (the graph and the gradients died with it), so the
  client loses the round and the coordinator readmits it next round. The group is formed again
  among the survivors (new generation, new port); the dead replica's steps since the last sync are
  lost (its clients' steps still count in ``steps_taken``).

Security note: this torch build's gloo has no ``TCP_TLS`` device, so the all-reduce traffic (trunk
adapter and moments, never client data or activations) is neither encrypted nor authenticated: keep
ranks on a private network. The relay is sealed on both hops (client-root and root-sub-server,
AES-256-GCM inside TLS); the root sees activations and gradients in the clear, as in sequential mode.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import Message

from fedsplit.adapters import adapter_state_dict, trainable_parameters
from fedsplit.channel import Channel, RemoteError
from fedsplit.config import HierarchyConfig
from fedsplit.protocol import ProtocolError, kind_name, pb
from fedsplit.security.errors import FrameError, HandshakeError
from fedsplit.security.tls import ChannelTLS
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import build_optimizer

if TYPE_CHECKING:
    from fedsplit.server.subserver import LocalSubServer, SubServerSpec

log = logging.getLogger(__name__)

RELAYED = frozenset({pb.FORWARD, pb.BACKWARD, pb.OPTIMIZER_STEP})
ROOT_PREFIX = "root."  # the root's sessions to a sub-server are named root.<client id>


class HierarchyError(RuntimeError):
    """The hierarchy cannot go on (no live sub-server, a group that cannot be formed)."""


class ControlError(RuntimeError):
    """A control-plane message is missing, unsigned, replayed or malformed."""


class ReplicaUnreachableError(ConnectionError):
    """A session to a sub-server could not be opened."""


# == control plane: signed messages in the root's TCPStore ======================================
class ControlOp(enum.Enum):
    FORM = "form"  # leave the old group, join generation g with these members (or retire if not one)
    SYNC = "sync"  # quiesce, then all-reduce the trainable state (AVERAGE or PUSH)
    GATHER = "gather"  # quiesce, then send the trainable state to rank 0 (diagnostics, tests)
    STOP = "stop"  # the run is over: leave the group and exit


class SyncMode(enum.Enum):
    AVERAGE = "average"  # replicas weighted by their steps since the last sync; the root weighs 0
    PUSH = "push"  # the root weighs 1, the replicas 0: copy the root's state everywhere


@dataclass(frozen=True)
class ControlMessage:
    """One root -> sub-server instruction; the fields after ``generation`` depend on ``op``."""

    seq: int
    op: ControlOp
    generation: int
    members: tuple[int, ...] = ()  # FORM: sub-server ranks; group rank = position + 1 (root = 0)
    host: str = ""  # FORM: tcp:// rendezvous host
    port: int = 0  # FORM: tcp:// rendezvous port (new for every generation)
    backend: str = "gloo"  # FORM
    timeout_s: float = 0.0  # FORM: collective timeout
    layout: str = ""  # FORM: digest of the trainable-state layout every member must have
    mode: str = ""  # SYNC: a SyncMode value
    reason: str = ""  # STOP

    def __post_init__(self) -> None:
        if self.op is ControlOp.FORM and not (self.members and self.port > 0 and self.timeout_s > 0 and self.layout):
            raise ControlError(f"FORM: expected members, port, timeout and layout, got {self}")
        if self.op is ControlOp.SYNC and self.mode not in {m.value for m in SyncMode}:
            raise ControlError(f"SYNC: expected a mode in {[m.value for m in SyncMode]}, got {self.mode!r}")

    def body(self) -> dict[str, Any]:
        return {**self.__dict__, "op": self.op.value, "members": list(self.members)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ControlMessage:
        try:
            return cls(**{**body, "op": ControlOp(body["op"]), "members": tuple(body["members"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlError(f"malformed control message {dict(body)}: {exc}") from exc


@dataclass(frozen=True)
class ControlResult:
    """A sub-server's answer to one ControlMessage."""

    seq: int
    rank: int
    ok: bool
    error: str = ""
    steps_since: int = 0  # optimizer steps since the last sync, before this message
    steps_taken: int = 0  # after this message
    digest: str = ""  # SYNC: sha256 of the trainable state after the all-reduce

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ControlResult:
        try:
            return cls(**body)
        except TypeError as exc:
            raise ControlError(f"malformed control result {dict(body)}: {exc}") from exc


@dataclass(frozen=True)
class Announcement:
    """A sub-server's first word: where it serves, and its process id."""

    rank: int
    address: str
    pid: int


_LABEL = b"fedsplit.hierarchy.control.v1\x00"
_ROOT_ROLE, _SUB_ROLE = b"root\x00", b"subserver\x00"


def seal_control(key: ed25519.Ed25519PrivateKey, role: bytes, body: Mapping[str, Any]) -> bytes:
    """``signature (64 bytes) || canonical JSON``; the signature covers a label and the signer's role."""
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return key.sign(_LABEL + role + data) + data


def open_control(key: ed25519.Ed25519PublicKey, role: bytes, blob: bytes, what: str) -> dict[str, Any]:
    signature, data = blob[:64], blob[64:]
    try:
        key.verify(signature, _LABEL + role + data)
        body = json.loads(data)
    except InvalidSignature:
        raise ControlError(f"{what}: bad signature (not from the {role[:-1].decode()} key)") from None
    except ValueError as exc:
        raise ControlError(f"{what}: signed but not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ControlError(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


def _store_key(run_id: str, *parts: object) -> str:
    return "/".join(["fedsplit", run_id, *map(str, parts)])


def _await_keys(store: Any, keys: Sequence[str], timeout_s: float) -> set[str]:
    """The subset of ``keys`` present in the store within ``timeout_s`` (never raises on timeout).

    Polls ``check``: a timed-out ``TCPStore.wait`` logs a C++ warning every time, and a sub-server
    waits for the root's next message most of its life.
    """
    deadline = time.monotonic() + timeout_s
    present: set[str] = set()
    while True:
        present |= {k for k in keys if k not in present and store.check([k])}
        if len(present) == len(keys) or time.monotonic() >= deadline:
            return present
        time.sleep(0.05)


class RootControl:
    """The root's end of the control plane; hosts the ``TCPStore``."""

    def __init__(self, store: Any, run_id: str, identity: ed25519.Ed25519PrivateKey, server_key: ed25519.Ed25519PublicKey) -> None:
        self.store, self.run_id = store, run_id
        self._identity, self._server_key = identity, server_key
        self.nonce = os.urandom(16).hex()  # binds every message to this root process
        self._seq = 0
        self._sign("hello", {"run": run_id, "nonce": self.nonce})

    @classmethod
    def listen(cls, host: str, port: int, run_id: str, identity: ed25519.Ed25519PrivateKey,
               server_key: ed25519.Ed25519PublicKey, timeout_s: float = 60.0) -> RootControl:
        from torch.distributed import TCPStore

        store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, run_id, identity, server_key)

    @property
    def port(self) -> int:
        return int(self.store.port)

    def _sign(self, key: str, body: Mapping[str, Any]) -> None:
        self.store.set(_store_key(self.run_id, key), seal_control(self._identity, _ROOT_ROLE, body))

    def _read(self, key: str) -> dict[str, Any]:
        body = open_control(self._server_key, _SUB_ROLE, self.store.get(_store_key(self.run_id, key)), key)
        if body.pop("run", None) != self.run_id or body.pop("nonce", None) != self.nonce:
            raise ControlError(f"{key}: written for another run or another root process")
        return body

    def announcements(self, ranks: Sequence[int], timeout_s: float) -> dict[int, Announcement]:
        """The announcements of ``ranks`` that arrive within ``timeout_s``."""
        keys = {_store_key(self.run_id, "announce", r): r for r in ranks}
        present = _await_keys(self.store, list(keys), timeout_s)
        found = [Announcement(**self._read(f"announce/{keys[k]}")) for k in present]
        return {a.rank: a for a in found}

    def post(self, op: ControlOp, generation: int, **fields: Any) -> ControlMessage:
        self._seq += 1
        message = ControlMessage(seq=self._seq, op=op, generation=generation, **fields)
        self._sign(f"ctl/{message.seq}", {**message.body(), "run": self.run_id, "nonce": self.nonce})
        return message

    def results(self, seq: int, ranks: Sequence[int], timeout_s: float) -> dict[int, ControlResult]:
        """The results for message ``seq`` that arrive within ``timeout_s``; a missing rank is absent."""
        keys = {_store_key(self.run_id, "res", seq, r): r for r in ranks}
        present = _await_keys(self.store, list(keys), timeout_s)
        out = {}
        for key in present:
            result = ControlResult.from_body(self._read(f"res/{seq}/{keys[key]}"))
            if (result.seq, result.rank) != (seq, keys[key]):
                raise ControlError(f"{key}: holds the result of message {result.seq} from rank {result.rank}")
            out[result.rank] = result
        return out


class SubControl:
    """A sub-server's end of the control plane: reads the root's messages in order, answers each."""

    def __init__(self, store: Any, run_id: str, rank: int, identity: ed25519.Ed25519PrivateKey,
                 root_key: ed25519.Ed25519PublicKey, nonce: str) -> None:
        self.store, self.run_id, self.rank = store, run_id, rank
        self._identity, self._root_key, self.nonce = identity, root_key, nonce
        self._next = 1

    @classmethod
    def connect(cls, host: str, port: int, run_id: str, rank: int, identity: ed25519.Ed25519PrivateKey,
                root_key: ed25519.Ed25519PublicKey, timeout_s: float) -> SubControl:
        from torch.distributed import TCPStore

        store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        hello = open_control(root_key, _ROOT_ROLE, store.get(_store_key(run_id, "hello")), "hello")
        if hello.get("run") != run_id:
            raise ControlError(f"the control store at {host}:{port} serves run {hello.get('run')!r}, not {run_id!r}")
        return cls(store, run_id, rank, identity, root_key, str(hello["nonce"]))

    def _sign(self, key: str, body: Mapping[str, Any]) -> None:
        data = seal_control(self._identity, _SUB_ROLE, {**body, "run": self.run_id, "nonce": self.nonce})
        self.store.set(_store_key(self.run_id, key), data)

    def announce(self, address: str) -> None:
        self._sign(f"announce/{self.rank}", {"rank": self.rank, "address": address, "pid": os.getpid()})

    def next(self, timeout_s: float) -> ControlMessage | None:
        """The next message in sequence, or ``None`` if none came within ``timeout_s``."""
        key = _store_key(self.run_id, "ctl", self._next)
        if not _await_keys(self.store, [key], timeout_s):
            return None
        body = open_control(self._root_key, _ROOT_ROLE, self.store.get(key), f"ctl/{self._next}")
        if body.pop("run", None) != self.run_id or body.pop("nonce", None) != self.nonce:
            raise ControlError(f"ctl/{self._next}: written for another run or another root process")
        message = ControlMessage.from_body(body)
        if message.seq != self._next:
            raise ControlError(f"ctl/{self._next}: holds message {message.seq} (replayed?)")
        self._next += 1
        return message

    def reply(self, result: ControlResult) -> None:
        self._sign(f"res/{result.seq}/{self.rank}", result.__dict__)


# == the trainable state as one vector, and the collectives over it =============================
def ensure_adam_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """Create AdamW's state (step 0, zero moments) for parameters that never stepped, as AdamW would."""
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("capturable") or group.get("fused"):
            raise HierarchyError("replica averaging supports plain AdamW (no amsgrad, capturable or fused)")
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=scalar)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass(frozen=True)
class ReplicaState:
    """One rank's trainable trunk state, by PEFT key (for inspection and tests)."""

    adapters: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    steps_taken: int
    steps_since: int


class TrainableState:
    """A trunk's LoRA weights and AdamW state as one float64 vector (the all-reduce payload).

    Per parameter, in ``trainable_parameters`` order: ``[weights, exp_avg, exp_avg_sq, step]``.
    """

    def __init__(self, trunk: Trunk, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(trunk).items()}
        if [tuple(p.shape) for p in params] != list(shapes.values()):
            raise HierarchyError("the optimizer's parameters are not the trunk's LoRA weights in order")
        self.names, self.params, self.optimizer = list(shapes), list(params), optimizer
        self.layout = hashlib.sha256(json.dumps(list(shapes.items())).encode()).hexdigest()
        self.numel = sum(3 * p.numel() + 1 for p in self.params)

    def flatten(self) -> torch.Tensor:
        ensure_adam_state(self.optimizer, self.params)
        pieces = []
        for p in self.params:
            state = self.optimizer.state[p]
            pieces += [p.detach().reshape(-1), state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1),
                       state["step"].reshape(1)]
        return torch.cat([x.to(torch.float64) for x in pieces])  # (numel,)

    def load(self, flat: torch.Tensor) -> None:
        ensure_adam_state(self.optimizer, self.params)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                state, n = self.optimizer.state[p], p.numel()
                for target in (p, state["exp_avg"], state["exp_avg_sq"]):
                    target.copy_(flat[offset : offset + n].view(p.shape))
                    offset += n
                state["step"].fill_(float(flat[offset]))
                offset += 1

    def unflatten(self, flat: torch.Tensor, steps_taken: int, steps_since: int) -> ReplicaState:
        out: dict[str, dict[str, Any]] = {"adapters": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        offset = 0
        for name, p in zip(self.names, self.params):
            n = p.numel()
            for part in ("adapters", "exp_avg", "exp_avg_sq"):
                out[part][name] = flat[offset : offset + n].view(p.shape).to(p.dtype).clone()
                offset += n
            out["step"][name] = float(flat[offset])
            offset += 1
        return ReplicaState(**out, steps_taken=steps_taken, steps_since=steps_since)

    def digest(self) -> str:
        return hashlib.sha256(self.flatten().numpy().tobytes()).hexdigest()


class ReduceStatus(enum.Enum):
    DONE = "done"
    NOTHING_TO_DO = "nothing_to_do"  # AVERAGE with no step anywhere since the last sync
    NOT_READY = "not_ready"  # a rank was mid-step: nobody changed anything
    LAYOUT_MISMATCH = "layout_mismatch"


@dataclass(frozen=True)
class ReduceOutcome:
    status: ReduceStatus
    total_steps: int = 0  # N: steps since the last sync over all ranks
    steps_taken: int = 0  # the LR-schedule position every rank now has


def reduce_state(
    state: TrainableState, *, group_rank: int, mode: SyncMode, ready: bool, steps_since: int,
    steps_taken: int, device: torch.device | str = "cpu",
) -> ReduceOutcome:
    """The averaging collective; every member of the process group calls it with the same ``mode``.

    Phase 1 all-reduces a header ``[not ready, n_k, layout size, root's steps_taken]`` so that every
    rank takes the same decision; phase 2 all-reduces ``w_k * state_k``. Raises on a collective error
    (a dead peer, the group timeout), leaving this rank's state unchanged.
    """
    import torch.distributed as dist

    root_steps = float(steps_taken) if group_rank == 0 else 0.0
    header = torch.tensor([0.0 if ready else 1.0, float(steps_since), float(state.numel), root_steps], dtype=torch.float64)
    header = _all_reduce(header, device)
    not_ready, total, numel, new_steps = header.tolist()
    if not_ready > 0:
        return ReduceOutcome(ReduceStatus.NOT_READY)
    if numel != dist.get_world_size() * state.numel:
        return ReduceOutcome(ReduceStatus.LAYOUT_MISMATCH)
    if mode is SyncMode.AVERAGE and total == 0:
        return ReduceOutcome(ReduceStatus.NOTHING_TO_DO, 0, int(new_steps))
    weight = steps_since / total if mode is SyncMode.AVERAGE else float(group_rank == 0)
    state.load(_all_reduce(state.flatten() * weight, device))
    return ReduceOutcome(ReduceStatus.DONE, int(total), int(new_steps))


def gather_state(state: TrainableState, *, group_rank: int, steps_taken: int, steps_since: int,
                 device: torch.device | str = "cpu") -> list[torch.Tensor] | None:
    """Every rank's ``[steps_taken, steps_since, state...]`` at rank 0 (``None`` elsewhere)."""
    import torch.distributed as dist

    flat = torch.cat([torch.tensor([float(steps_taken), float(steps_since)], dtype=torch.float64), state.flatten()])
    flat = flat.to(device)
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())] if group_rank == 0 else None
    dist.gather(flat, gather_list=out, dst=0)
    return None if out is None else [t.cpu() for t in out]


def _all_reduce(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    import torch.distributed as dist

    moved = tensor.to(device)
    dist.all_reduce(moved)  # SUM
    return moved.cpu()


# == process groups: one generation at a time ====================================================
@dataclass(frozen=True)
class GroupSpec:
    generation: int
    host: str
    port: int
    rank: int  # 0 = root
    world_size: int
    backend: str
    timeout_s: float

    @property
    def device(self) -> torch.device:
        if self.backend != "nccl":
            return torch.device("cpu")
        return torch.device("cuda", self.rank % torch.cuda.device_count())


def join_group(spec: GroupSpec) -> None:
    """Leave the current process group (if any) and join generation ``spec.generation``."""
    import torch.distributed as dist

    leave_group()
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.device)
    dist.init_process_group(
        spec.backend, init_method=f"tcp://{spec.host}:{spec.port}", rank=spec.rank, world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def choose_backend(requested: str, world_size: int) -> str:
    """``auto``: nccl when this machine has a GPU for every rank, else gloo."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# == the root's trunk: ReplicaRouter ============================================================
class ReplicaStatus(enum.Enum):
    LIVE = "live"
    DEAD = "dead"


class GateStage(enum.Enum):
    OPEN = "open"  # steps flow
    DRAINING = "draining"  # no new step starts; started ones finish
    REDUCING = "reducing"  # a collective runs; nothing is relayed


_GATE_NEXT: dict[GateStage, frozenset[GateStage]] = {
    GateStage.OPEN: frozenset({GateStage.DRAINING}),
    GateStage.DRAINING: frozenset({GateStage.REDUCING, GateStage.OPEN}),
    GateStage.REDUCING: frozenset({GateStage.OPEN}),
}


@dataclass
class _Replica:
    rank: int
    address: str
    pid: int
    status: ReplicaStatus = ReplicaStatus.LIVE
    clients: set[str] = field(default_factory=set)
    steps_since: int = 0  # optimizer steps relayed to it since the last sync


@dataclass(frozen=True)
class ReplicaFailure:
    rank: int
    reason: str
    moved: dict[str, int]  # client -> its new sub-server


@dataclass(frozen=True)
class SyncReport:
    ok: bool
    mode: SyncMode
    generation: int
    members: tuple[int, ...]
    status: str  # a ReduceStatus value, or "failed"
    total_steps: int  # N: steps averaged
    steps_taken: int
    duration_s: float
    discarded: tuple[str, ...] = ()  # clients whose started step was dropped to drain
    error: str = ""


@dataclass
class RelayStats:
    """Relayed requests and the time the root spent in them (includes the sub-server's work)."""

    calls: int = 0
    seconds: float = 0.0
    retried_forwards: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RelayCredentials:
    """How the root opens its sessions to the sub-servers."""

    identity: ed25519.Ed25519PrivateKey = field(repr=False)  # the root's own key; sub-servers admit it
    server_key: ed25519.Ed25519PublicKey  # the server identity key (root and sub-servers share it)
    run_id: str
    config_hash: bytes
    tls: ChannelTLS | None = None
    insecure: bool = False
    server_name: str | None = None  # TLS name override when the sub-server address is not in the certificate


class ReplicaRouter:
    """The root's trunk: TrunkServer's surface (``handle``, ``abort``, ``trunk``, ``optimizer``,
    ``params``, ``steps_taken``) over K remote replicas. See the module docstring.

    The root's own ``trunk`` / ``optimizer`` hold the state of the last sync. Reading them is a sync
    point: if the replicas took steps since, they are averaged first (this is how the round-end sync
    happens with a coordinator that does not call :meth:`end_round`). Changing them from outside
    (``restore_trunk``) is detected at the next step, which then pushes the root's state first.
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
        self.replicas: dict[int, _Replica] = {}
        self.assignment: dict[str, int] = {}
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
    def _await_announcements(self, ranks: list[int]) -> dict[int, Announcement]:
        """Announcements within the start-up timeout; stops early once every missing local process has died."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        found: dict[int, Announcement] = {}
        while True:
            remaining = deadline - time.monotonic()
            found = self.control.announcements(ranks, max(0.0, min(1.0, remaining)))
            missing = [r for r in ranks if r not in found]
            dead = [r for r in missing if r in self._alive and not self._alive[r]()]
            if not missing or remaining <= 0 or (missing and len(dead) == len(missing)):
                return found

    def start(self) -> ReplicaRouter:
        """Wait for the sub-servers, assign the clients, form generation 1, push the root's state."""
        ranks = list(range(1, self.config.subservers + 1))
        found = self._await_announcements(ranks)
        for rank in ranks:
            if rank in found:
                self.replicas[rank] = _Replica(rank, found[rank].address, found[rank].pid)
            else:
                self.replicas[rank] = _Replica(rank, "", 0, ReplicaStatus.DEAD)
                self.failures.append(ReplicaFailure(rank, f"no announcement in {self.config.startup_timeout_s} s", {}))
        if not found:
            raise HierarchyError(f"no sub-server announced itself within {self.config.startup_timeout_s} s")
        for index, client in enumerate(sorted(self.clients)):
            self._assign(client, sorted(found)[index % len(found)])
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
    @property
    def trunk(self) -> Trunk:
        self._settle()
        return self._trunk

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self._settle()
        return self._optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        self._settle()
        return self._params

    @property
    def steps_taken(self) -> int:
        return self._base_steps + self._relayed

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:  # restore_trunk: the root's state is authoritative again
        with self._cond:
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
        """Average the replicas if they took steps since the last sync (the round-end sync)."""
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
                raise ProtocolError(f"client {client_id}: the sub-servers did not finish syncing in {limit} s", code=pb.ABORTED)

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
        if to not in _GATE_NEXT[self._gate]:
            raise HierarchyError(f"gate: {self._gate.name} -> {to.name} is not a valid transition")
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
                raise ProtocolError(f"{kind_name(kind)}: sub-server {rank} failed ({exc}); step discarded", code=pb.ABORTED) from exc
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
                self.stats.calls += 1
                self.stats.seconds += time.perf_counter() - started
                self.stats.by_kind[kind_name(kind)] = self.stats.by_kind.get(kind_name(kind), 0) + 1

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

    def _connect(self, client_id: str, replica: _Replica) -> Channel:
        from fedsplit.transport.grpc_client import connect_grpc
        from fedsplit.transport.handshake import ClientCredentials

        c = self.credentials
        creds = ClientCredentials(c.identity, c.server_key, ROOT_PREFIX + client_id, c.run_id, c.config_hash)
        try:
            return connect_grpc(replica.address, creds, tls=c.tls, insecure=c.insecure, server_name=c.server_name,
                                deadline_s=self.config.relay_deadline_s, connect_timeout_s=self.config.probe_timeout_s)
        except (ConnectionError, RemoteError, HandshakeError, ProtocolError) as exc:
            raise ReplicaUnreachableError(f"sub-server {replica.rank} at {replica.address}: {exc}") from exc

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
        if replica.status is ReplicaStatus.LIVE and self._process_alive(rank) and self._listening(replica):
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

    def _listening(self, replica: _Replica) -> bool:
        """A plain TCP connect first: a refused port fails at once, gRPC would retry until its deadline."""
        host, _, port = replica.address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=self.config.probe_timeout_s).close()
        except OSError:
            return False
        return True

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
        replica.status = ReplicaStatus.DEAD
        moved: dict[str, int] = {}
        for client in sorted(replica.clients):
            if self._mid_step.get(client) == rank:
                del self._mid_step[client]
                self._lost[client] = f"sub-server {rank} failed"
            if self._live():
                moved[client] = self._assign(client, self._least_loaded())
        replica.clients.clear()
        self._reform = True
        self.failures.append(ReplicaFailure(rank, reason, moved))
        log.error("sub-server %d is dead (%s); clients moved: %s", rank, reason, moved)
        self._cond.notify_all()

    def _live(self) -> list[int]:
        return sorted(r for r, rep in self.replicas.items() if rep.status is ReplicaStatus.LIVE)

    def _least_loaded(self) -> int:
        return min(self._live(), key=lambda r: (len(self.replicas[r].clients), r))

    def _assign(self, client_id: str, rank: int) -> int:
        old = self.assignment.get(client_id)
        if old is not None:
            self.replicas[old].clients.discard(client_id)
        self.assignment[client_id] = rank
        self.replicas[rank].clients.add(client_id)
        return rank

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
                if self._reform:
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
        self._exposed = False

    def _root_changed(self) -> bool:
        """Whether the root's state differs from what the replicas got at the last sync."""
        if self._synced is None:
            return True
        if not self._exposed:
            return False
        flat, steps = self._synced
        self._exposed = False
        return steps != self._base_steps or not torch.equal(flat, self._state.flatten())

    def _settle(self) -> None:
        """Before the root's state is handed out: bring it up to date with the replicas."""
        with self._cond:
            behind = self._relayed > 0 and self._live() and not self._closed
        if behind:
            self.sync()  # a failed sync is logged and reported; the root keeps the last good state
        with self._cond:
            self._exposed = True

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
        if self._reform:
            self._form()
        message = self.control.post(ControlOp.GATHER, self.generation)
        try:
            flats = gather_state(self._state, group_rank=0, steps_taken=self._base_steps, steps_since=0,
                                 device=self._device)
        finally:
            self._check_results(message, self._members, "GATHER")
        assert flats is not None, "rank 0 receives the gather"
        ranks = (0, *self._members)
        return {r: self._state.unflatten(f[2:], int(f[0]), int(f[1])) for r, f in zip(ranks, flats)}

    @property
    def live_replicas(self) -> list[int]:
        with self._cond:
            return self._live()



# == one call for the root: control plane, spec file, local sub-servers, router ====================
@dataclass
class Hierarchy:
    """A started hierarchy: the router (the coordinator's trunk) and the local sub-server processes."""

    router: ReplicaRouter
    spec_path: Path  # the spec file the sub-servers read (``--root-config``)
    processes: dict[int, LocalSubServer]  # local launches only

    def close(self, timeout_s: float = 30.0) -> None:
        """STOP the sub-servers and wait for their processes (killed after ``timeout_s``)."""
        import subprocess

        self.router.close()
        for local in self.processes.values():
            try:
                local.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                local.process.kill()
                local.process.wait()


def start_hierarchy(spec: SubServerSpec, trunk: Trunk, root_identity: ed25519.Ed25519PrivateKey,
                    directory: Path | str, *, launch: bool = True) -> Hierarchy:
    """Host the control plane, write ``directory/hierarchy.toml``, start the sub-servers, start the router.

    ``hierarchy.control_port`` 0 in ``spec`` is replaced by the port actually bound. ``launch=False`` starts no process: run
    ``fedsplit subserver --root-config hierarchy.toml --rank K`` on each sub-server machine instead.
    ``trunk`` is the root's copy (LoRA injected as on the clients); it is never run.
    """
    # Imported here: subserver imports this module (it shares the control plane and the collectives).
    from fedsplit.security.identity import load_private_key
    from fedsplit.security.tls import load_channel_tls
    from fedsplit.server.subserver import launch_local, write_spec

    h, sec = spec.hierarchy, spec.security
    server_key = load_private_key(sec.server_key).public_key()
    control = RootControl.listen(h.control_host, h.control_port, spec.run.run_id, root_identity, server_key,
                                 h.startup_timeout_s)
    spec = dataclasses.replace(spec, hierarchy=dataclasses.replace(h, control_port=control.port))
    path = write_spec(Path(directory) / "hierarchy.toml", spec)
    ranks = range(1, h.subservers + 1)
    processes = launch_local(path, ranks, log_dir=Path(directory)) if launch else {}
    credentials = RelayCredentials(root_identity, server_key, spec.run.run_id, bytes.fromhex(spec.run.config_hash),
                                   tls=None if sec.insecure else load_channel_tls(sec.ca_cert), insecure=sec.insecure)
    router = ReplicaRouter(trunk, spec.train, spec.run.total_steps, control=control, credentials=credentials,
                           clients=spec.run.clients, config=spec.hierarchy,
                           alive={rank: local.alive for rank, local in processes.items()})
    try:
        router.start()
    except BaseException:
        for local in processes.values():
            local.process.kill()
        raise
    return Hierarchy(router, path, processes)
