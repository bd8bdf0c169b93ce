"""The FL-GLM server's network end (arXiv 2406.14898): one gRPC bidi stream per client session.

    stream opens -> CLIENT_HELLO --SessionFactory.accept--> SERVER_HELLO      (or ERROR, stream ends)
    then, per request: chunks -> Reassembler -> ServerSession.handle -> split_frame -> chunks

Each stream holds one worker thread of the server's pool for its lifetime and one reader thread,
so that every wait for the client has a deadline: ``handshake_timeout_s`` for the ClientHello,
``idle_timeout_s`` for each later message.

Slots. Streams that have not yet authenticated (a stranger needs no key to open one) are bounded
apart from admitted ones: at most ``max_pending_handshakes`` wait for their hello at once, and a
new stream evicts the oldest waiting one, so a flood of silent streams cannot keep an honest
client (whose hello follows its stream at once) out. An admitted client holds at most
``max_sessions_per_client`` sessions: a newer one (a reconnect) replaces its oldest, so no client
can use up the slots of the others. At most ``max_streams`` sessions are authenticated at once;
the pool has room for those plus twice the pending ones, so the eviction always gets to run.
When an authenticated stream ends for any reason
(goodbye, disconnect, timeout, broken frame, server stop) ``on_disconnect(client_id)`` runs once,
so the coordinator can drop that client's partial step.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc

from fedsplit.channel import ServerSession, parse_frame
from fedsplit.protocol import ProtocolError, decode_payload, kind_name, pb
from fedsplit.security.errors import HandshakeError
from fedsplit.security.pki import client_uri
from fedsplit.security.tls import ServerTLS, warn_insecure_transport
from fedsplit.transport.chunking import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Reassembler,
    check_sizes,
    split_frame,
)
from fedsplit.transport.errors import TransportError
from fedsplit.transport.grpc_common import GRPC_STATUS, SERVICE, grpc_options
from fedsplit.transport.handshake import error_frame, hello_frame, refusal_code, session_discarded

__all__ = ["SessionAcceptor", "GrpcServer"]

log = logging.getLogger(__name__)

_HELLO_MAX_BYTES = 64 * 1024
_INBOX_CAPACITY = 4  # messages read ahead of the handler: backpressure on a flooding client


class SessionAcceptor(Protocol):
    """What the server needs from a `fedsplit.transport.handshake.SessionFactory`."""

    def accept(self, message: pb.ClientHello) -> tuple[pb.ServerHello, ServerSession]: ...


class _Dropped(Exception):
    """The server dropped this stream (e.g. the client was revoked)."""


class _Inbox:
    """Reads one stream's requests on its own thread, so the handler can wait with a timeout."""

    def __init__(self, requests: Iterator[bytes], peer: str) -> None:
        self._items: deque[bytes] = deque()
        self._ended = False  # the client half-closed or the stream broke
        self._closed = False  # the handler is done: stop reading
        self._dropped: str | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(requests,), name=f"fedsplit-inbox {peer}", daemon=True)
        self._thread.start()

    def _pump(self, requests: Iterator[bytes]) -> None:
        try:
            for message in requests:
                if not self._put(message):
                    return
        except grpc.RpcError:
            pass  # cancelled or broken: the handler sees the end of the stream
        except Exception:  # noqa: BLE001 - a reader thread must always report the end
            log.exception("request stream reader failed")
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _put(self, message: bytes) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < _INBOX_CAPACITY or self._closed)
            if self._closed:
                return False
            self._items.append(message)
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float) -> bytes | None:
        """The next message; ``None`` once the stream ended; `TimeoutError` after ``timeout_s``;
        `_Dropped` once `drop` was called."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._ended or self._dropped, timeout_s):
                raise TimeoutError
            if self._dropped is not None:
                raise _Dropped(self._dropped)
            if not self._items:
                return None
            message = self._items.popleft()
            self._cond.notify_all()
            return message

    def drop(self, reason: str) -> None:
        with self._cond:
            self._dropped = reason
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _end(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Finish the stream with a status instead of a frame (the handler returns right after)."""
    context.set_code(code)
    context.set_details(details)


def _parse_hello(message: bytes) -> pb.ClientHello:
    frame = parse_frame(message)
    if frame.kind != pb.CLIENT_HELLO or frame.chunk_count > 1:
        raise ProtocolError(
            f"a session starts with an unchunked CLIENT_HELLO, got {kind_name(frame.kind)}", code=pb.FAILED_PRECONDITION
        )
    return decode_payload(pb.CLIENT_HELLO, frame.body)


def _tls_client_names(context: grpc.ServicerContext) -> set[str]:
    """SAN entries of the verified mutual-TLS client certificate (empty without one)."""
    return {name.decode() for name in context.auth_context().get("x509_subject_alternative_name", [])}


class GrpcServer:
    """Serves `FedSplit.Session` streams; see the module docstring. Use ``start()`` / ``stop()``."""

    def __init__(
        self,
        address: str,
        session_factory: SessionAcceptor,
        *,
        tls: ServerTLS | None = None,
        insecure: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float = 600.0,
        max_streams: int = 16,
        max_sessions_per_client: int = 2,
        max_pending_handshakes: int = 16,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        if (tls is None) == (not insecure):
            raise ValueError("pass tls=ServerTLS(...) or insecure=True (exactly one)")
        check_sizes(max_message_bytes, max_frame_bytes)
        for name, value in (("handshake_timeout_s", handshake_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (
            ("max_streams", max_streams),
            ("max_sessions_per_client", max_sessions_per_client),
            ("max_pending_handshakes", max_pending_handshakes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.address = address
        self.session_factory = session_factory
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_streams = max_streams
        self.max_sessions_per_client = max_sessions_per_client
        self.max_pending_handshakes = max_pending_handshakes
        self.on_disconnect = on_disconnect
        self._server: grpc.Server | None = None
        self._port = 0
        self._lock = threading.Lock()
        self._streams: dict[str, dict[_Inbox, None]] = {}  # live authenticated streams per client id, oldest first
        self._pending: dict[_Inbox, None] = {}  # streams waiting for their hello, oldest first

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> GrpcServer:
        if self._server is not None:
            raise RuntimeError(f"server on {self.address} is already started")
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {"Session": grpc.stream_stream_rpc_method_handler(self._session)},  # bytes in, bytes out
        )
        slots = self.max_streams + 2 * self.max_pending_handshakes  # room to evict before gRPC refuses
        server = grpc.server(
            ThreadPoolExecutor(max_workers=slots, thread_name_prefix="fedsplit-stream"),
            handlers=[handler],
            options=[*grpc_options(self.max_message_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=slots,
        )
        self._port = self._bind(server)
        server.start()
        self._server = server
        log.info("fedsplit server listening on port %d (%s)", self._port, "TLS" if self.tls else "INSECURE")
        return self

    def _bind(self, server: grpc.Server) -> int:
        try:
            if self.tls is None:
                log.warning("server on %s runs WITHOUT TLS (insecure=True)", self.address)
                warn_insecure_transport(self.address)
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, grpc.ssl_server_credentials(**self.tls.grpc_kwargs()))
        except RuntimeError as exc:
            raise TransportError(f"cannot listen on {self.address}: {exc}") from exc
        if port == 0:
            raise TransportError(f"cannot listen on {self.address}")
        return port

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def active_clients(self) -> dict[str, int]:
        """Number of live authenticated streams per client id."""
        with self._lock:
            return {client_id: len(inboxes) for client_id, inboxes in self._streams.items()}

    def drop(self, client_id: str, reason: str) -> int:
        """End every live stream of ``client_id`` (PERMISSION_DENIED, ``reason``); e.g. after
        revoking it in the verifier. A request being handled is answered first. Returns the count."""
        with self._lock:
            inboxes = list(self._streams.get(client_id, ()))
        for inbox in inboxes:
            inbox.drop(reason)
        if inboxes:
            log.warning("client %s: dropping %d stream(s): %s", client_id, len(inboxes), reason)
        return len(inboxes)

    def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new streams, give running ones ``grace`` seconds, then cancel them."""
        if self._server is not None:
            self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; False if ``timeout`` ran out first."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)

    # -- one stream -----------------------------------------------------------------------------
    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        inbox = _Inbox(requests, context.peer())
        self._admit_pending(inbox)
        try:
            session = yield from self._handshake(inbox, context)
            if session is not None:
                yield from self._serve(session, inbox, context)
        finally:
            with self._lock:
                self._pending.pop(inbox, None)
            inbox.close()

    def _admit_pending(self, inbox: _Inbox) -> None:
        """Count a stream that has not authenticated; evict the oldest such stream beyond the cap."""
        with self._lock:
            self._pending[inbox] = None
            evicted = list(self._pending)[: max(0, len(self._pending) - self.max_pending_handshakes)]
            for old in evicted:
                del self._pending[old]
        for old in evicted:
            old.drop(f"evicted: more than {self.max_pending_handshakes} streams were waiting for their hello")

    def _handshake(self, inbox: _Inbox, context: grpc.ServicerContext) -> Generator[bytes, None, ServerSession | None]:
        try:
            first = inbox.get(self.handshake_timeout_s)
        except TimeoutError:
            _end(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"no CLIENT_HELLO within {self.handshake_timeout_s}s")
            return None
        except _Dropped as exc:
            _end(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return None
        with self._lock:
            self._pending.pop(inbox, None)  # it has spoken: its fate is the handshake's now
        if first is None:
            return None
        try:
            server_hello, session = self._accept(first, context)
        except (HandshakeError, ProtocolError) as exc:
            log.warning("handshake from %s refused (%s): %s", context.peer(), type(exc).__name__, exc)
            yield error_frame(refusal_code(exc), str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a broken factory must not kill the server
            log.exception("handshake from %s failed", context.peer())
            yield error_frame(pb.INTERNAL, f"{type(exc).__name__}: {exc}")
            return None
        if not self._track(session.client_id, inbox, context):
            if self.on_disconnect is not None:
                self.on_disconnect(session.client_id)  # its session was counted when it was accepted
            yield error_frame(pb.RESOURCE_EXHAUSTED, f"the server holds {self.max_streams} sessions; try again later")
            return None
        yield hello_frame(pb.SERVER_HELLO, server_hello.SerializeToString())
        return session

    def _accept(self, first: bytes, context: grpc.ServicerContext) -> tuple[pb.ServerHello, ServerSession]:
        if len(first) > _HELLO_MAX_BYTES:
            raise ProtocolError(
                f"first frame of {len(first)} bytes is too large for a hello", code=pb.RESOURCE_EXHAUSTED
            )
        hello = _parse_hello(first)
        if self.tls is not None and self.tls.require_client_auth:
            names = _tls_client_names(context)
            if client_uri(hello.client_id) not in names:  # the TLS certificate must name the same client
                raise ProtocolError(
                    f"hello names client {hello.client_id!r} but its TLS client certificate names {sorted(names)}",
                    code=pb.PERMISSION_DENIED,
                )
        return self.session_factory.accept(hello)

    def _serve(self, session: ServerSession, inbox: _Inbox, context: grpc.ServicerContext) -> Iterator[bytes]:
        assembler = Reassembler(self.max_frame_bytes)
        while True:
            try:
                frame = self._next_frame(inbox, assembler)
            except _Dropped as exc:
                _end(context, grpc.StatusCode.PERMISSION_DENIED, f"session dropped by the server: {exc}")
                return
            except TimeoutError:
                log.warning("client %s: idle for %ss, closing its stream", session.client_id, self.idle_timeout_s)
                _end(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {self.idle_timeout_s}s")
                return
            except ProtocolError as exc:
                log.warning("client %s: broken chunk stream: %s", session.client_id, exc)
                _end(context, GRPC_STATUS.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
                return
            if frame is None:
                return
            try:
                reply = session.handle_parts(*frame)
            except Exception as exc:  # noqa: BLE001 - e.g. the session's sequence space is used up
                log.exception("client %s: cannot answer", session.client_id)
                _end(context, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                return
            yield from split_frame(reply, self.max_message_bytes)
            if session_discarded(session):
                _end(context, grpc.StatusCode.UNAUTHENTICATED, "the first frame of the session failed to open")
                return

    def _next_frame(self, inbox: _Inbox, assembler: Reassembler) -> tuple[pb.Frame, bytes | memoryview] | None:
        while True:
            message = inbox.get(self.idle_timeout_s)
            if message is None:
                return None
            frame = assembler.add_parts(message)
            if frame is not None:
                return frame

    # -- disconnects ----------------------------------------------------------------------------
    def _track(self, client_id: str, inbox: _Inbox, context: grpc.ServicerContext) -> bool:
        """Count an authenticated stream; its client's oldest beyond the per-client cap is replaced."""
        with self._lock:
            if sum(len(v) for v in self._streams.values()) >= self.max_streams and client_id not in self._streams:
                return False
            mine = self._streams.setdefault(client_id, {})
            mine[inbox] = None
            replaced = list(mine)[: max(0, len(mine) - self.max_sessions_per_client)]
        for old in replaced:
            old.drop(f"replaced by a newer session of client {client_id}")
        if replaced:
            log.warning("client %s: %d older session(s) replaced by a new one", client_id, len(replaced))
        if not context.add_callback(lambda: self._disconnected(client_id, inbox)):
            self._disconnected(client_id, inbox)  # the stream already ended
        return True

    def _disconnected(self, client_id: str, inbox: _Inbox) -> None:
        with self._lock:
            inboxes = self._streams.get(client_id, {})
            inboxes.pop(inbox, None)
            if not inboxes:
                self._streams.pop(client_id, None)
        log.info("client %s: stream ended", client_id)
        if self.on_disconnect is None:
            return
        try:
            self.on_disconnect(client_id)
        except Exception:  # noqa: BLE001 - runs on a gRPC thread; must not escape
            log.exception("on_disconnect(%r) failed", client_id)
