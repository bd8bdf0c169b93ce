"""Shared fixtures for the security tests: identities, a controllable clock, a verifier factory."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.security.handshake import (
    ClientHandshake,
    HandshakeVerifier,
    ServerHello,
    SessionKeys,
    client_hello,
    finish_client,
    hash_run_config,
)
from fedsplit.security.identity import generate_identity
from fedsplit.security.wire import PROTOCOL_VERSION

from .helpers import RUN_ID, FakeClock


@dataclass
class World:
    """A server and two admitted clients (alice, bob) sharing one run configuration and clock."""

    server: ed25519.Ed25519PrivateKey = field(default_factory=generate_identity)
    alice: ed25519.Ed25519PrivateKey = field(default_factory=generate_identity)
    bob: ed25519.Ed25519PrivateKey = field(default_factory=generate_identity)
    clock: FakeClock = field(default_factory=FakeClock)
    config_hash: bytes = hash_run_config(
        {"model": "tiny-llama", "split": [1, 3], "lora": {"r": 8}, "tokenizer": "bytes"}
    )

    def verifier(self, **overrides: object) -> HandshakeVerifier:
        """A verifier admitting alice and bob; keyword arguments override the defaults."""
        arguments: dict[str, object] = {
            "server_identity": self.server,
            "admitted": {"alice": self.alice.public_key(), "bob": self.bob.public_key()},
            "revoked": set(),
            "protocol_version": PROTOCOL_VERSION,
            "config_hash": self.config_hash,
            "max_skew_s": 60.0,
            "clock": self.clock,
        }
        arguments.update(overrides)
        return HandshakeVerifier(**arguments)  # type: ignore[arg-type]

    def hello(self, client_id: str = "alice", **overrides: object) -> ClientHandshake:
        """A signed hello from ``client_id`` (by default with that client's own identity)."""
        arguments: dict[str, object] = {
            "identity": getattr(self, client_id, self.alice),
            "run_id": RUN_ID,
            "client_id": client_id,
            "config_hash": self.config_hash,
            "clock": self.clock,
        }
        arguments.update(overrides)
        return client_hello(**arguments)  # type: ignore[arg-type]

    def finish(
        self, pending: ClientHandshake, reply: ServerHello, clock: FakeClock | None = None
    ) -> SessionKeys:
        """The client's side of the handshake, pinning the real server key."""
        return finish_client(pending, reply, self.server.public_key(), clock=clock or self.clock)


@pytest.fixture
def world() -> World:
    return World()
