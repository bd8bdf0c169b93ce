"""The root's sessions to its sub-servers in server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3).

The root relays a client's steps over a session of its own to the client's sub-server, named
``root.<client id>`` and signed with the root's identity key (the sub-servers admit it under
those names): the client's frames are opened on the root and sealed again for the sub-server.
This module opens those sessions and probes a sub-server's port; which sub-server a client goes
to, and what happens when one fails, is the router's business (:mod:`.router`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.channel import Channel, RemoteError
from fedsplit.protocol import ProtocolError
from fedsplit.security.errors import HandshakeError
from fedsplit.security.tls import ChannelTLS
from fedsplit.server.hierarchy import ROOT_PREFIX


class ReplicaUnreachableError(ConnectionError):
    """A session to a sub-server could not be opened."""


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


@dataclass
class RelayStats:
    """Relayed requests and the time the root spent in them (includes the sub-server's work)."""

    calls: int = 0
    seconds: float = 0.0
    retried_forwards: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, seconds: float) -> None:
        self.calls += 1
        self.seconds += seconds
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def open_relay(credentials: RelayCredentials, client_id: str, rank: int, address: str, *, deadline_s: float,
               connect_timeout_s: float) -> Channel:
    """A session ``root.<client_id>`` to sub-server ``rank`` at ``address``; raises ReplicaUnreachableError."""
    from fedsplit.transport.grpc_client import connect_grpc
    from fedsplit.transport.handshake import ClientCredentials

    c = credentials
    creds = ClientCredentials(c.identity, c.server_key, ROOT_PREFIX + client_id, c.run_id, c.config_hash)
    try:
        return connect_grpc(address, creds, tls=c.tls, insecure=c.insecure, server_name=c.server_name,
                            deadline_s=deadline_s, connect_timeout_s=connect_timeout_s)
    except (ConnectionError, RemoteError, HandshakeError, ProtocolError) as exc:
        raise ReplicaUnreachableError(f"sub-server {rank} at {address}: {exc}") from exc


def listening(address: str, timeout_s: float) -> bool:
    """A plain TCP connect: a refused port fails at once, where gRPC would retry until its deadline."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True
