"""Fixtures for transport tests: keys and certificates from the real keygen, a toy trunk handler,
a server factory on 127.0.0.1:0, and a TCP tap that records every byte on the loopback wire."""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import Message

from fedsplit.channel import Channel
from fedsplit.protocol import ProtocolError, decode_payload, decode_tensor, encode_tensor, pb
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
from fedsplit.security.identity import generate_identity, load_private_key
from fedsplit.security.pki import run_issue_client_cert
from fedsplit.security.tls import ChannelTLS, ServerTLS, load_channel_tls, load_server_tls
from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

RUN_ID = "run-1"
CONFIG_HASH = hash_run_config({"model": "tiny", "split": [1, 2]})


def toy_handler(client_id: str, kind: int, round: int, step: int, request: Message) -> Message:  # noqa: A002
    """FORWARD doubles the hidden state; JOIN_ROUND echoes the round; anything else is refused."""
    if kind == pb.FORWARD:
        hidden = decode_tensor(request.hidden, "Forward.hidden")
        return pb.ForwardResult(hidden=encode_tensor(hidden * 2))
    if kind == pb.JOIN_ROUND:
        return pb.RoundPlan(round=round, settings={"client": client_id})
    raise ProtocolError(f"toy handler does not serve kind {kind}", code=pb.FAILED_PRECONDITION)


def forward(channel: Channel, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
    reply = channel.call(pb.FORWARD, pb.Forward(hidden=encode_tensor(hidden)), round=1, step=step)
    return decode_tensor(reply.hidden, "ForwardResult.hidden")


def open_error(channel: Channel, reply: bytes) -> pb.Error:
    """Open a reply frame with the channel's session keys; it must be an ERROR."""
    frame = pb.Frame.FromString(reply)
    assert frame.kind == pb.ERROR, frame.kind
    return decode_payload(pb.ERROR, channel.sealer.open(frame.kind, frame.round, frame.step, frame.seq, frame.body))


@dataclass
class Keys:
    """Everything keygen produces for one run: TLS files, identities, the admitted set."""

    directory: Path
    server: ed25519.Ed25519PrivateKey
    clients: dict[str, ed25519.Ed25519PrivateKey] = field(default_factory=dict)

    def server_tls(self, mutual: bool = False) -> ServerTLS:
        ca = self.directory / "ca.crt" if mutual else None
        return load_server_tls(self.directory / "server-tls.key", self.directory / "server-tls.crt", ca)

    def channel_tls(self, tls_client: str | None = None) -> ChannelTLS:
        if tls_client is None:
            return load_channel_tls(self.directory / "ca.crt")
        d = self.directory
        return load_channel_tls(d / "ca.crt", d / f"{tls_client}-tls.key", d / f"{tls_client}-tls.crt")

    def credentials(self, who: str, **overrides: object) -> ClientCredentials:
        """Credentials of admitted client ``who``; ``overrides`` replace single fields."""
        fields: dict[str, object] = {
            "identity": self.clients[who],
            "server_key": self.server.public_key(),
            "client_id": who,
            "run_id": RUN_ID,
            "config_hash": CONFIG_HASH,
        }
        fields.update(overrides)
        return ClientCredentials(**fields)  # type: ignore[arg-type]

    def verifier(self) -> HandshakeVerifier:
        admitted = {cid: key.public_key() for cid, key in self.clients.items()}
        return HandshakeVerifier(self.server, admitted, [], pb.PROTOCOL_VERSION_CURRENT, CONFIG_HASH, run_id=RUN_ID)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    run_keygen(directory, "server", with_ca=True)
    for client_id in ("alice", "bob"):
        run_issue_client_cert(directory, client_id)
    return Keys(
        directory,
        load_private_key(directory / "server.key"),
        {"alice": generate_identity(), "bob": generate_identity()},
    )


@dataclass
class Disconnects:
    """Records on_disconnect calls; ``wait_for`` blocks until a client id shows up."""

    seen: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, client_id: str) -> None:
        with self.changed:
            self.seen.append(client_id)
            self.changed.notify_all()

    def wait_for(self, client_id: str, timeout_s: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: client_id in self.seen, timeout_s)


StartServer = Callable[..., GrpcServer]


@pytest.fixture
def start_server(keys: Keys) -> Iterator[StartServer]:
    """``start_server(**GrpcServer kwargs)``: TLS by default, the toy handler, stopped at teardown."""
    servers: list[GrpcServer] = []

    def start(**kwargs: object) -> GrpcServer:
        factory = kwargs.pop("session_factory", None) or SessionFactory(
            keys.verifier(), lambda cid: functools.partial(toy_handler, cid), RUN_ID
        )
        if not kwargs.get("insecure"):
            kwargs.setdefault("tls", keys.server_tls())
        server = GrpcServer("127.0.0.1:0", factory, **kwargs).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def dial(keys: Keys) -> Iterator[Callable[..., Channel]]:
    """``dial(server, client_id, **connect_grpc kwargs)``: a TLS channel by default, closed at teardown."""
    channels: list[Channel] = []

    def open_channel(server: GrpcServer, client_id: str, *, credentials: ClientCredentials | None = None,
                     **kwargs: object) -> Channel:
        if not kwargs.get("insecure"):
            kwargs.setdefault("tls", keys.channel_tls())
        kwargs.setdefault("connect_timeout_s", 5.0)
        creds = credentials or keys.credentials(client_id)
        channel = connect_grpc(f"127.0.0.1:{server.port}", creds, **kwargs)  # type: ignore[arg-type]
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


class TcpTap:
    """A loopback TCP relay to ``target_port`` that keeps a copy of every byte in both directions."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def tap_to() -> Iterator[Callable[[int], TcpTap]]:
    taps: list[TcpTap] = []

    def make(port: int) -> TcpTap:
        taps.append(TcpTap(port))
        return taps[-1]

    yield make
    for tap in taps:
        tap.close()
