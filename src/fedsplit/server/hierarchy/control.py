"""The control plane of server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3).

The root drives every collective with messages in a ``TCPStore`` it hosts; each sub-server reads
them in order and answers each with a result::

    fedsplit/<run>/hello           root:  {run, nonce}              (the nonce binds all that follows)
    fedsplit/<run>/announce/<k>    sub k: {rank, address, pid}      (where it serves)
    fedsplit/<run>/ctl/<seq>       root:  ControlMessage            (FORM, SYNC, GATHER, STOP)
    fedsplit/<run>/res/<seq>/<k>   sub k: ControlResult

Every value is Ed25519-signed (:mod:`fedsplit.security.signing`; the root's identity, the server
identity the sub-servers hold) and carries the run id and the root's nonce; messages carry a
sequence number the reader checks: a party on the network can read or delete them, not forge or
replay them.
"""

from __future__ import annotations

import datetime
import enum
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.security.signing import ROOT_ROLE, SUBSERVER_ROLE, ControlError, open_control, seal_control
from fedsplit.server.hierarchy.collectives import SyncMode

__all__ = ["Announcement", "ControlError", "ControlMessage", "ControlOp", "ControlResult", "RootControl", "SubControl"]


class ControlOp(enum.Enum):
    FORM = "form"  # leave the old group, join generation g with these members (or retire if not one)
    SYNC = "sync"  # quiesce, then all-reduce the trainable state (AVERAGE or PUSH)
    GATHER = "gather"  # quiesce, then send the trainable state to rank 0 (diagnostics, tests)
    STOP = "stop"  # the run is over: leave the group and exit


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

    def __init__(self, store: Any, run_id: str, identity: ed25519.Ed25519PrivateKey,
                 server_key: ed25519.Ed25519PublicKey) -> None:
        self.store, self.run_id = store, run_id
        self._identity, self._server_key = identity, server_key
        self.nonce = os.urandom(16).hex()  # binds every message to this root process
        self._seq = 0
        self._sign("hello", {"run": run_id, "nonce": self.nonce})

    @classmethod
    def listen(cls, host: str, port: int, run_id: str, identity: ed25519.Ed25519PrivateKey,
               server_key: ed25519.Ed25519PublicKey, timeout_s: float = 60.0) -> RootControl:
        from torch.distributed import TCPStore

        store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
        return cls(store, run_id, identity, server_key)

    @property
    def port(self) -> int:
        return int(self.store.port)

    def _sign(self, key: str, body: Mapping[str, Any]) -> None:
        self.store.set(_store_key(self.run_id, key), seal_control(self._identity, ROOT_ROLE, body))

    def _read(self, key: str) -> dict[str, Any]:
        body = open_control(self._server_key, SUBSERVER_ROLE, self.store.get(_store_key(self.run_id, key)), key)
        if body.pop("run", None) != self.run_id or body.pop("nonce", None) != self.nonce:
            raise ControlError(f"{key}: written for another run or another root process")
        return body

    def announcements(self, ranks: Sequence[int], timeout_s: float) -> dict[int, Announcement]:
        """The announcements of ``ranks`` that arrive within ``timeout_s``."""
        keys = {_store_key(self.run_id, "announce", r): r for r in ranks}
        present = _await_keys(self.store, list(keys), timeout_s)
        found = [Announcement(**self._read(f"announce/{keys[k]}")) for k in present]
        return {a.rank: a for a in found}

    def await_announcements(self, ranks: Sequence[int], timeout_s: float,
                            exited: Callable[[int], bool]) -> dict[int, Announcement]:
        """The announcements within ``timeout_s``; stops early once every missing rank has ``exited``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            found = self.announcements(ranks, max(0.0, min(1.0, remaining)))
            missing = [r for r in ranks if r not in found]
            if not missing or remaining <= 0 or all(exited(r) for r in missing):
                return found

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
        hello = open_control(root_key, ROOT_ROLE, store.get(_store_key(run_id, "hello")), "hello")
        if hello.get("run") != run_id:
            raise ControlError(f"the control store at {host}:{port} serves run {hello.get('run')!r}, not {run_id!r}")
        return cls(store, run_id, rank, identity, root_key, str(hello["nonce"]))

    def _sign(self, key: str, body: Mapping[str, Any]) -> None:
        data = seal_control(self._identity, SUBSERVER_ROLE, {**body, "run": self.run_id, "nonce": self.nonce})
        self.store.set(_store_key(self.run_id, key), data)

    def announce(self, address: str) -> None:
        self._sign(f"announce/{self.rank}", {"rank": self.rank, "address": address, "pid": os.getpid()})

    def next(self, timeout_s: float) -> ControlMessage | None:
        """The next message in sequence, or ``None`` if none came within ``timeout_s``."""
        key = _store_key(self.run_id, "ctl", self._next)
        if not _await_keys(self.store, [key], timeout_s):
            return None
        body = open_control(self._root_key, ROOT_ROLE, self.store.get(key), f"ctl/{self._next}")
        if body.pop("run", None) != self.run_id or body.pop("nonce", None) != self.nonce:
            raise ControlError(f"ctl/{self._next}: written for another run or another root process")
        message = ControlMessage.from_body(body)
        if message.seq != self._next:
            raise ControlError(f"ctl/{self._next}: holds message {message.seq} (replayed?)")
        self._next += 1
        return message

    def reply(self, result: ControlResult) -> None:
        self._sign(f"res/{result.seq}/{self.rank}", result.__dict__)

