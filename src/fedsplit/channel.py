"""The one path every byte between a client and the server takes (STYLE rule 7).

    client: message -> serialize -> seal -> Frame -> transport ----.
    server: Frame -> open -> parse -> handler -> serialize -> seal -'-> back

A :class:`Channel` is the client's end, a :class:`ServerSession` the server's end of one client
session. Both are independent of how frames move: :class:`InProcessTransport` hands them to the
server in the same process (still as bytes, exactly as the network carries them), the gRPC
transport (:mod:`fedsplit.transport`) over a socket. Sealing is pluggable: :class:`PlainSealer`
only numbers frames; :class:`fedsplit.security.SecureSession` encrypts them with AES-256-GCM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError, Message

from fedsplit.protocol import PAYLOADS, PROTOCOL_VERSION, REPLY_TO, ProtocolError, decode_payload, kind_name, pb

log = logging.getLogger(__name__)


class SealedLike(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def ciphertext(self) -> bytes: ...


class Sealer(Protocol):
    """Protects frame bodies of one session; AES-GCM in :mod:`fedsplit.security`."""

    def seal(self, kind: int, round: int, step: int, plaintext: bytes) -> SealedLike: ...

    def open(self, kind: int, round: int, step: int, seq: int, ciphertext: bytes | memoryview) -> bytes | memoryview:
        """The plaintext; a writable ``memoryview`` (a reassembled frame) may be opened in place."""
        ...


@dataclass
class _Sealed:
    seq: int
    ciphertext: bytes


class PlainSealer:
    """No encryption, but the same sequence-number discipline as the real sealer."""

    def __init__(self) -> None:
        self._send_seq = 0
        self._recv_seq = 0

    def seal(self, kind: int, round: int, step: int, plaintext: bytes) -> _Sealed:
        self._send_seq += 1
        return _Sealed(self._send_seq, bytes(plaintext))

    def open(self, kind: int, round: int, step: int, seq: int, ciphertext: bytes | memoryview) -> bytes | memoryview:
        if seq <= self._recv_seq:
            raise ProtocolError(f"{kind_name(kind)}: sequence number {seq} is not after {self._recv_seq}")
        self._recv_seq = seq
        return ciphertext


class Transport(Protocol):
    """Moves one request frame to the server and returns its reply frame, both as bytes."""

    def exchange(self, frame: bytes) -> bytes: ...

    def close(self) -> None: ...


class RemoteError(RuntimeError):
    """The server answered with an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"server error {pb.ErrorCode.Name(code)}: {message}")
        self.code = code
        self.remote_message = message


@dataclass
class WireStats:
    """Bytes and frames through one channel, for the transport benchmark and the metrics file."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def _frame(kind: int, round: int, step: int, sealed: SealedLike) -> bytes:
    frame = pb.Frame(  # the ignore: protoc's .pyi types an enum field as the enum only; protobuf takes its int
        protocol_version=PROTOCOL_VERSION, kind=kind, round=round, step=step, seq=sealed.seq, body=sealed.ciphertext  # type: ignore[arg-type]
    )
    data: bytes = frame.SerializeToString()
    return data


def parse_frame(data: bytes) -> pb.Frame:
    """Parse one frame and check its protocol version."""
    frame = pb.Frame()
    try:
        frame.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed frame ({exc})") from None
    check_version(frame)
    return frame


def check_version(frame: pb.Frame) -> None:
    if frame.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {frame.protocol_version} is not supported; this side speaks version {PROTOCOL_VERSION}",
            code=pb.FAILED_PRECONDITION,
        )


class Channel:
    """The client's end of a session: typed request in, typed reply out."""

    def __init__(self, transport: Transport, sealer: Sealer | None = None) -> None:
        self.transport = transport
        self.sealer: Sealer = sealer if sealer is not None else PlainSealer()
        self.stats = WireStats()
        self._lock = threading.Lock()

    def call(self, kind: int, message: Message, *, round: int = 0, step: int = 0) -> Message:
        """Send ``message`` as ``kind`` and return the server's reply; raise :class:`RemoteError` on ERROR."""
        with self._lock:  # one request in flight per session keeps sequence numbers in order
            request = _frame(kind, round, step, self.sealer.seal(kind, round, step, message.SerializeToString()))
            reply_bytes = self.transport.exchange(request)
            self.stats.frames_sent += 1
            self.stats.bytes_sent += len(request)
            self.stats.frames_received += 1
            self.stats.bytes_received += len(reply_bytes)
            reply = parse_frame(reply_bytes)
            body = self.sealer.open(reply.kind, reply.round, reply.step, reply.seq, reply.body)
        payload = decode_payload(reply.kind, body)
        if reply.kind == pb.ERROR:
            raise RemoteError(payload.code, payload.message)
        if reply.kind != REPLY_TO[kind]:
            raise ProtocolError(f"{kind_name(kind)} was answered with {kind_name(reply.kind)}")
        return payload

    def close(self) -> None:
        self.transport.close()


Handler = Callable[[int, int, int, Message], Message]
"""``handler(kind, round, step, request) -> reply`` on the server, for one client session."""


class ServerSession:
    """The server's end of one client session: opens, dispatches, seals; errors become ERROR frames."""

    def __init__(self, client_id: str, handler: Handler, sealer: Sealer | None = None) -> None:
        self.client_id = client_id
        self.handler = handler
        self.sealer: Sealer = sealer if sealer is not None else PlainSealer()
        self.stats = WireStats()

    def handle(self, data: bytes) -> bytes:
        """Answer one request frame (bytes) with one reply frame (bytes)."""
        try:
            frame = parse_frame(data)
        except ProtocolError as exc:
            self.stats.frames_received += 1
            self.stats.bytes_received += len(data)
            return self._reply_error(exc, pb.ERROR, 0, 0)
        return self.handle_parts(frame, frame.body, size=len(data))

    def handle_parts(self, frame: pb.Frame, body: bytes | memoryview, *, size: int | None = None) -> bytes:
        """:meth:`handle` for a frame already split into header and body (a reassembled chunked frame,
        whose writable body the sealer may decrypt in place)."""
        self.stats.frames_received += 1
        self.stats.bytes_received += len(body) if size is None else size
        kind, round, step = frame.kind, frame.round, frame.step
        try:
            check_version(frame)
            if kind not in REPLY_TO:
                raise ProtocolError(f"{kind_name(kind)} is not a request")
            request = decode_payload(kind, self.sealer.open(kind, round, step, frame.seq, body))
            reply = self.handler(kind, round, step, request)
            reply_kind = REPLY_TO[kind]
            if not isinstance(reply, PAYLOADS[reply_kind]):
                raise TypeError(f"handler answered {kind_name(kind)} with {type(reply).__name__}")
        except ProtocolError as exc:
            return self._reply_error(exc, kind, round, step)
        except Exception as exc:  # the server keeps serving: one bad request is that client's error
            log.exception("client %s: %s failed", self.client_id, kind_name(kind))
            reply, reply_kind = pb.Error(code=pb.INTERNAL, message=f"{type(exc).__name__}: {exc}"), pb.ERROR
        return self._send(reply_kind, round, step, reply)

    def _reply_error(self, exc: ProtocolError, kind: int, round: int, step: int) -> bytes:
        log.warning("client %s: rejected %s: %s", self.client_id, kind_name(kind), exc)
        error = pb.Error(code=exc.code, message=str(exc))  # type: ignore[arg-type]  # protoc's .pyi takes only the enum type; protobuf takes its int
        return self._send(pb.ERROR, round, step, error)

    def _send(self, kind: int, round: int, step: int, reply: Message) -> bytes:
        out = _frame(kind, round, step, self.sealer.seal(kind, round, step, reply.SerializeToString()))
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(out)
        return out


class InProcessTransport:
    """Hands each frame, as bytes, to a :class:`ServerSession` in this process."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session

    def exchange(self, frame: bytes) -> bytes:
        return self.session.handle(frame)

    def close(self) -> None:
        pass


def in_process_channel(client_id: str, handler: Handler) -> tuple[Channel, ServerSession]:
    """A connected client/server pair of session ends in this process."""
    session = ServerSession(client_id, handler)
    return Channel(InProcessTransport(session)), session
