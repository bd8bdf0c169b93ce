"""Errors of the network transport under FL-GLM's client-server channel (arXiv 2406.14898).

`TransportError` is a failure to move bytes (no connection, a wait that ran out, a stream that
ended); `HandshakeRefusedError` is the server's explicit refusal of a session, carrying the
protocol `ErrorCode` it sent. Frame-level protocol violations stay `fedsplit.protocol.ProtocolError`.
"""

from __future__ import annotations

from fedsplit.channel import RemoteError

__all__ = ["TransportError", "HandshakeRefusedError"]


class TransportError(ConnectionError):
    """The transport could not connect, a wait exceeded its deadline, or the stream ended."""


class HandshakeRefusedError(RemoteError):
    """The server answered the ClientHello with an ERROR frame; ``code`` says why."""
