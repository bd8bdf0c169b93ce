"""The FL-GLM client's network end (arXiv 2406.14898): `Transport.exchange` over one gRPC stream.

    exchange(frame) -> split_frame -> outbox -> [gRPC request stream] ... server
    exchange(frame) <- Reassembler <- replies <- reader thread <- [gRPC response stream]

Requests are fed to the stream from a queue, replies are read on a thread into another queue, so
every wait has a deadline: ``connect_timeout_s`` for the connection (TCP + TLS), ``deadline_s``
for each complete reply. A wait that runs out, or a stream that ends, raises `TransportError`
naming the address and the wait, and leaves the transport closed: after a lost reply the
session's sequence numbers can no longer be trusted, so the caller reconnects (new handshake).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from fedsplit.channel import Channel
from fedsplit.protocol import ProtocolError
from fedsplit.security.tls import ChannelTLS, warn_insecure_transport
from fedsplit.transport.chunking import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Reassembler,
    check_sizes,
    split_frame,
)
from fedsplit.transport.errors import TransportError
from fedsplit.transport.grpc_common import METHOD, grpc_options
from fedsplit.transport.handshake import ClientCredentials, connect

__all__ = ["TransportStats", "GrpcTransport", "connect_grpc"]

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 300.0  # above the trunk's lease timeout: a FORWARD may wait for the trunk


@dataclass
class TransportStats:
    """gRPC message payload bytes sent and received (serialized Frames and chunks).

    HTTP/2 and TLS framing add a few dozen bytes per message on top of these counts.
    """

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0


@dataclass(frozen=True)
class _Ended:
    reason: str


class GrpcTransport:
    """One `FedSplit.Session` stream to ``address``; connects in the constructor."""

    def __init__(
        self,
        address: str,
        *,
        tls: ChannelTLS | None = None,
        insecure: bool = False,
        server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        deadline_s: float = DEFAULT_DEADLINE_S,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if (tls is None) == (not insecure):
            raise ValueError("pass tls=ChannelTLS(...) or insecure=True (exactly one)")
        check_sizes(max_message_bytes, max_frame_bytes)
        for name, value in (("deadline_s", deadline_s), ("connect_timeout_s", connect_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self.deadline_s = deadline_s
        self.stats = TransportStats()
        self._lock = threading.Lock()
        self._closed: str | None = None  # why the transport is unusable
        self._channel = self._open_channel(tls, server_name)
        self._wait_ready(connect_timeout_s)
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._replies: queue.Queue[bytes | _Ended] = queue.Queue()
        self._call = self._channel.stream_stream(METHOD)(self._requests())  # bytes in, bytes out
        self._reader = threading.Thread(target=self._read, name=f"fedsplit-replies {address}", daemon=True)
        self._reader.start()

    # -- connection -----------------------------------------------------------------------------
    def _open_channel(self, tls: ChannelTLS | None, server_name: str | None) -> grpc.Channel:
        options: list[tuple[str, int | str]] = list(grpc_options(self.max_message_bytes))
        if tls is None:
            log.warning("connection to %s runs WITHOUT TLS (insecure=True)", self.address)
            warn_insecure_transport(self.address)
            return grpc.insecure_channel(self.address, options=options)
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(**tls.grpc_kwargs()), options=options)

    def _wait_ready(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise TransportError(
                f"could not connect to {self.address} within {timeout_s}s: server down, wrong address, "
                f"or the TLS handshake failed (check the pinned CA, the server certificate's host names "
                f"and, for mutual TLS, the client certificate)"
            ) from None

    # -- the two ends of the stream -------------------------------------------------------------
    def _requests(self) -> Iterator[bytes]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self._call:
                self._replies.put(message)
            self._replies.put(_Ended("the server closed the stream"))
        except grpc.RpcError as exc:
            self._replies.put(_Ended(f"{exc.code().name}: {exc.details()}"))

    # -- Transport ------------------------------------------------------------------------------
    def exchange(self, frame: bytes) -> bytes:
        """Send one frame (chunked if needed) and return the server's complete reply frame."""
        with self._lock:
            if self._closed is not None:
                raise TransportError(f"transport to {self.address} is closed: {self._closed}")
            try:
                self._send(frame)
                return self._receive(time.monotonic() + self.deadline_s)
            except (TransportError, ProtocolError) as exc:
                self._shut(str(exc))
                raise

    def _send(self, frame: bytes) -> None:
        for chunk in split_frame(frame, self.max_message_bytes):
            self._outbox.put(chunk)
            self.stats.messages_sent += 1
            self.stats.bytes_sent += len(chunk)
        self.stats.frames_sent += 1

    def _receive(self, deadline: float) -> bytes:
        assembler = Reassembler(self.max_frame_bytes)
        while True:
            message = self._next_reply(deadline)
            self.stats.messages_received += 1
            self.stats.bytes_received += len(message)
            whole = assembler.add(message)
            if whole is not None:
                self.stats.frames_received += 1
                return whole

    def _next_reply(self, deadline: float) -> bytes:
        try:
            item = self._replies.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TransportError(
                f"no reply from {self.address} within {self.deadline_s}s (waiting for the answer to request "
                f"frame {self.stats.frames_sent})"
            ) from None
        if isinstance(item, _Ended):
            raise TransportError(f"stream to {self.address} ended while waiting for a reply: {item.reason}")
        return item

    def close(self) -> None:
        """Half-close and cancel the stream, close the channel. Idempotent."""
        with self._lock:
            self._shut("closed by the client")

    def _shut(self, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self._outbox.put(None)
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_grpc(
    address: str,
    credentials: ClientCredentials,
    *,
    tls: ChannelTLS | None = None,
    insecure: bool = False,
    server_name: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    deadline_s: float = DEFAULT_DEADLINE_S,
    connect_timeout_s: float = 10.0,
) -> Channel:
    """Open a stream to ``address`` and run the handshake; the Channel's transport is a `GrpcTransport`."""
    transport = GrpcTransport(
        address,
        tls=tls,
        insecure=insecure,
        server_name=server_name,
        max_message_bytes=max_message_bytes,
        max_frame_bytes=max_frame_bytes,
        deadline_s=deadline_s,
        connect_timeout_s=connect_timeout_s,
    )
    return connect(transport, credentials)
