"""Handshake glue without sockets: protobuf mapping, refusal codes, the sealer adapter, connect()."""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

from fedsplit.channel import ServerSession
from fedsplit.protocol import PROTOCOL_VERSION, ProtocolError, decode_payload, pb
from fedsplit.security.errors import (
    AuthenticationError,
    BadSignatureError,
    ConfigMismatchError,
    NotAdmittedError,
    RevokedError,
    RunMismatchError,
    ServerAuthenticationError,
    UnknownClientError,
)
from fedsplit.security.handshake import HandshakeVerifier, client_hello
from fedsplit.security.identity import generate_identity, public_key_raw, short_fingerprint
from fedsplit.transport.errors import HandshakeRefusedError
from fedsplit.transport.handshake import (
    SessionFactory,
    client_hello_from_proto,
    client_hello_to_proto,
    connect,
    error_frame,
    hello_frame,
    refusal_code,
    server_hello_from_proto,
    session_discarded,
)

from .conftest import CONFIG_HASH, RUN_ID, Keys, forward, open_error, toy_handler


class LoopbackTransport:
    """The server's handshake-then-session logic in the same process, over frame bytes."""

    def __init__(self, factory: SessionFactory, tamper_session_id: bool = False) -> None:
        self.factory = factory
        self.tamper_session_id = tamper_session_id
        self.session: ServerSession | None = None
        self.closed = False

    def exchange(self, frame: bytes) -> bytes:
        if self.session is not None:
            return self.session.handle(frame)
        hello = decode_payload(pb.CLIENT_HELLO, pb.Frame.FromString(frame).body)
        try:
            server_hello, self.session = self.factory.accept(hello)
        except Exception as exc:  # noqa: BLE001 - becomes the ERROR frame, as on the server
            return error_frame(refusal_code(exc), str(exc))
        if self.tamper_session_id:
            server_hello.session_id = "00" * 16
        return hello_frame(pb.SERVER_HELLO, server_hello.SerializeToString())

    def close(self) -> None:
        self.closed = True


def factory_for(keys: Keys, verifier: HandshakeVerifier | None = None, run_id: str = RUN_ID) -> SessionFactory:
    return SessionFactory(verifier or keys.verifier(), lambda cid: functools.partial(toy_handler, cid), run_id)


def test_client_hello_survives_protobuf_bit_for_bit(keys: Keys) -> None:
    hello = client_hello(keys.clients["alice"], RUN_ID, "alice", CONFIG_HASH).hello

    wire = pb.ClientHello.FromString(client_hello_to_proto(hello).SerializeToString())

    assert client_hello_from_proto(wire) == hello


def test_server_hello_takes_its_identity_key_from_the_pin() -> None:
    pinned = public_key_raw(generate_identity().public_key())
    message = pb.ServerHello(ephemeral_key=b"e" * 32, nonce=b"n" * 32, timestamp=1.5, signature=b"s" * 64)

    assert server_hello_from_proto(message, pinned).identity_key == pinned


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BadSignatureError("x"), pb.UNAUTHENTICATED),
        (UnknownClientError("x"), pb.PERMISSION_DENIED),
        (RevokedError("x"), pb.PERMISSION_DENIED),
        (ConfigMismatchError("x"), pb.FAILED_PRECONDITION),
        (RunMismatchError("x"), pb.FAILED_PRECONDITION),
        (ProtocolError("x", code=pb.RESOURCE_EXHAUSTED), pb.RESOURCE_EXHAUSTED),
        (KeyError("x"), pb.INTERNAL),
    ],
)
def test_refusal_codes(error: Exception, code: int) -> None:
    assert refusal_code(error) == code


def test_connect_gives_a_sealed_channel_that_works(keys: Keys) -> None:
    channel = connect(LoopbackTransport(factory_for(keys)), keys.credentials("alice"))
    hidden = torch.randn(2, 3, 4)

    assert torch.equal(forward(channel, hidden), hidden * 2)
    assert type(channel.sealer).__name__ == "SecureSession"


def test_a_frame_that_fails_to_open_is_refused_as_unauthenticated(keys: Keys) -> None:
    transport = LoopbackTransport(factory_for(keys))
    channel = connect(transport, keys.credentials("alice"))
    request = pb.Frame(
        protocol_version=PROTOCOL_VERSION, kind=pb.JOIN_ROUND, seq=5, body=b"\x00" * 40
    ).SerializeToString()

    error = open_error(channel, transport.exchange(request))

    assert error.code == pb.UNAUTHENTICATED
    assert AuthenticationError.__name__ in error.message
    assert transport.session is not None and session_discarded(transport.session)  # it was the first frame


def test_a_failure_after_the_first_good_frame_keeps_the_session(keys: Keys) -> None:
    transport = LoopbackTransport(factory_for(keys))
    channel = connect(transport, keys.credentials("alice"))
    forward(channel, torch.ones(1))
    request = pb.Frame(
        protocol_version=PROTOCOL_VERSION, kind=pb.JOIN_ROUND, seq=5, body=b"\x00" * 40
    ).SerializeToString()

    assert open_error(channel, transport.exchange(request)).code == pb.UNAUTHENTICATED
    assert transport.session is not None and not session_discarded(transport.session)
    assert torch.equal(forward(channel, torch.ones(1)), torch.full((1,), 2.0))


def test_refused_handshake_raises_with_the_code_and_closes_the_transport(keys: Keys) -> None:
    transport = LoopbackTransport(factory_for(keys))
    stranger = keys.credentials("alice", client_id="mallory", identity=generate_identity())

    with pytest.raises(HandshakeRefusedError, match="not admitted") as info:
        connect(transport, stranger)

    assert info.value.code == pb.PERMISSION_DENIED
    assert transport.closed


def test_factory_enforces_its_run_id_even_if_the_verifier_does_not(keys: Keys) -> None:
    admitted = {cid: key.public_key() for cid, key in keys.clients.items()}
    lax = HandshakeVerifier(keys.server, admitted, [], PROTOCOL_VERSION, CONFIG_HASH)  # no run_id
    transport = LoopbackTransport(factory_for(keys, lax, run_id="other-run"))

    with pytest.raises(HandshakeRefusedError, match="other-run") as info:
        connect(transport, keys.credentials("alice"))

    assert info.value.code == pb.FAILED_PRECONDITION


def test_client_refuses_a_server_hello_with_a_foreign_session_id(keys: Keys) -> None:
    with pytest.raises(ServerAuthenticationError, match="session id"):
        connect(LoopbackTransport(factory_for(keys), tamper_session_id=True), keys.credentials("alice"))


def test_client_refuses_a_server_that_is_not_the_pinned_one(keys: Keys) -> None:
    admitted = {"alice": keys.clients["alice"].public_key()}
    impostor = HandshakeVerifier(generate_identity(), admitted, [], PROTOCOL_VERSION, CONFIG_HASH)

    with pytest.raises(ServerAuthenticationError):
        connect(LoopbackTransport(factory_for(keys, impostor)), keys.credentials("alice"))


def test_a_stranger_learns_only_not_admitted_and_the_server_log_says_why(keys: Keys, caplog) -> None:
    # Arrange: an unknown id, an admitted id with a wrong key, an admitted id and key with a forged signature
    factory = factory_for(keys)
    alice = keys.clients["alice"]
    genuine = client_hello(alice, RUN_ID, "alice", CONFIG_HASH).hello
    forged = dataclasses.replace(genuine, signature=bytes(64))
    hellos = {
        "unknown id": client_hello(generate_identity(), RUN_ID, "mallory", CONFIG_HASH).hello,
        "wrong key": client_hello(generate_identity(), RUN_ID, "alice", CONFIG_HASH).hello,
        "forged signature": forged,
    }

    # Act
    refusals = {}
    with caplog.at_level(logging.WARNING, logger="fedsplit.transport.handshake"):
        for name, hello in hellos.items():
            with pytest.raises(NotAdmittedError) as info:
                factory.accept(client_hello_to_proto(hello))
            refusals[name] = (refusal_code(info.value), str(info.value))

    # Assert: one code, one sentence (only the id the stranger sent itself); the detail stays in the log
    assert {code for code, _ in refusals.values()} == {pb.PERMISSION_DENIED}
    assert refusals["wrong key"][1] == refusals["forged signature"][1] == "client 'alice' is not admitted to this run"
    assert refusals["unknown id"][1] == "client 'mallory' is not admitted to this run"
    alice_fingerprint = short_fingerprint(alice.public_key())
    assert not any(alice_fingerprint in message or "bob" in message for _, message in refusals.values())
    logged = caplog.text
    assert "admitted ids: alice, bob" in logged and alice_fingerprint in logged and "invalid signature" in logged
