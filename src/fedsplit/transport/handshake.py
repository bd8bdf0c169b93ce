"""The session handshake on the wire: protobuf hellos, server sessions, client channels.

FL-GLM (arXiv 2406.14898, Sec. 3) encrypts each client's activations and gradients with keys
only that client and the server hold. `fedsplit.security.handshake` derives those keys; this
module carries its two messages as the first Frame exchange of a session and hands the result to
the channel layer:

    client: ClientCredentials -> connect(transport) -> CLIENT_HELLO --> SessionFactory.accept
    client: Channel(transport, SecureSession)  <-- SERVER_HELLO <-- (ServerHello, ServerSession)

Hellos are signed, not sealed; everything after them is sealed. Frames that fail to open on the
server (tampered, replayed, sealed for another client) are answered with UNAUTHENTICATED and the
session goes on, because a rejected frame does not move the receive counter.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError

from fedsplit.channel import Channel, Handler, SealedLike, Sealer, ServerSession, Transport
from fedsplit.protocol import PROTOCOL_VERSION, ProtocolError, decode_payload, kind_name, pb
from fedsplit.security.errors import (
    BadSignatureError,
    ConfigMismatchError,
    FrameError,
    HandshakeError,
    KeyAgreementError,
    KeyMismatchError,
    MalformedHandshakeError,
    NotAdmittedError,
    ProtocolVersionError,
    ReplayCacheFullError,
    RevokedError,
    RunMismatchError,
    ServerAuthenticationError,
    UnknownClientError,
)
from fedsplit.security.handshake import (
    DEFAULT_MAX_SKEW_S,
    ClientHello,
    HandshakeVerifier,
    ServerHello,
    client_hello,
    finish_client,
)
from fedsplit.security.identity import public_key_raw
from fedsplit.security.wire import HASH_LEN, Role, check_bytes, check_identifier
from fedsplit.transport.errors import HandshakeRefusedError

__all__ = [
    "ClientCredentials",
    "SessionFactory",
    "GuardedSealer",
    "client_hello_to_proto",
    "client_hello_from_proto",
    "server_hello_to_proto",
    "server_hello_from_proto",
    "refusal_code",
    "session_discarded",
    "hello_frame",
    "error_frame",
    "connect",
]

log = logging.getLogger(__name__)

# What a stranger may not learn: whether an id is admitted, or with which key. These refusals
# are logged in detail on the server and answered with one NotAdmittedError.
NOT_ADMITTED_ERRORS: tuple[type[HandshakeError], ...] = (UnknownClientError, KeyMismatchError, BadSignatureError)

# Which ErrorCode a refused handshake is answered with; the most specific class wins.
REFUSAL_CODES: dict[type[Exception], int] = {
    MalformedHandshakeError: pb.BAD_REQUEST,
    ProtocolVersionError: pb.FAILED_PRECONDITION,
    ConfigMismatchError: pb.FAILED_PRECONDITION,
    RunMismatchError: pb.FAILED_PRECONDITION,
    UnknownClientError: pb.PERMISSION_DENIED,
    NotAdmittedError: pb.PERMISSION_DENIED,
    RevokedError: pb.PERMISSION_DENIED,
    KeyMismatchError: pb.UNAUTHENTICATED,
    KeyAgreementError: pb.UNAUTHENTICATED,
    ReplayCacheFullError: pb.RESOURCE_EXHAUSTED,
    HandshakeError: pb.UNAUTHENTICATED,
    ProtocolError: pb.BAD_REQUEST,
}


def refusal_code(exc: Exception) -> int:
    """The ErrorCode for a refused handshake (`ProtocolError` keeps its own code)."""
    if isinstance(exc, ProtocolError):
        return exc.code
    for cls in type(exc).__mro__:
        if cls in REFUSAL_CODES:
            return REFUSAL_CODES[cls]
    return pb.INTERNAL


# --- dataclass <-> protobuf ---------------------------------------------------------------------


def client_hello_to_proto(hello: ClientHello) -> pb.ClientHello:
    return pb.ClientHello(
        protocol_version=hello.protocol_version,
        run_id=hello.run_id,
        client_id=hello.client_id,
        identity_key=hello.identity_key,
        ephemeral_key=hello.ephemeral_key,
        nonce=hello.nonce,
        timestamp=hello.timestamp,
        config_hash=hello.config_hash,
        signature=hello.signature,
        config_sections=dict(hello.config_sections),
    )


def client_hello_from_proto(message: pb.ClientHello) -> ClientHello:
    """Rebuild and check the fields; raises `MalformedHandshakeError`."""
    return ClientHello(
        protocol_version=message.protocol_version,
        run_id=message.run_id,
        client_id=message.client_id,
        identity_key=message.identity_key,
        ephemeral_key=message.ephemeral_key,
        nonce=message.nonce,
        timestamp=message.timestamp,
        config_hash=message.config_hash,
        signature=message.signature,
        config_sections=dict(message.config_sections),
    )


def server_hello_to_proto(hello: ServerHello, session_id: bytes) -> pb.ServerHello:
    """The schema has no identity_key: the client restores it from its pin (see below)."""
    return pb.ServerHello(
        ephemeral_key=hello.ephemeral_key,
        nonce=hello.nonce,
        timestamp=hello.timestamp,
        signature=hello.signature,
        session_id=session_id.hex(),
    )


def server_hello_from_proto(message: pb.ServerHello, pinned_identity_raw: bytes) -> ServerHello:
    """Rebuild the signed ServerHello with the pinned server key as ``identity_key``.

    The signature covers the identity key, so a server holding any other key fails
    `finish_client` with `ServerAuthenticationError`, exactly as if the key had travelled.
    """
    return ServerHello(
        identity_key=pinned_identity_raw,
        ephemeral_key=message.ephemeral_key,
        nonce=message.nonce,
        timestamp=message.timestamp,
        signature=message.signature,
    )


# --- frames of the handshake --------------------------------------------------------------------


def hello_frame(kind: int, body: bytes) -> bytes:
    """A plaintext handshake frame (hellos are signed, there are no keys to seal with yet)."""
    # the ignores: protoc's .pyi types an enum field as the enum only; protobuf takes its int value
    return pb.Frame(protocol_version=PROTOCOL_VERSION, kind=kind, body=body).SerializeToString()  # type: ignore[arg-type]


def error_frame(code: int, message: str) -> bytes:
    return hello_frame(pb.ERROR, pb.Error(code=code, message=message).SerializeToString())  # type: ignore[arg-type]


# --- server side --------------------------------------------------------------------------------


class GuardedSealer:
    """Sealer adapter: a frame that fails to open becomes ``ProtocolError(UNAUTHENTICATED)``.

    `ServerSession` turns `ProtocolError` into an ERROR frame and keeps serving, so a tampered,
    replayed or misdirected frame costs the sender one refused request, nothing more. The one
    exception is the session's first frame: it is the only key confirmation the protocol has, so
    if it fails the session is marked ``discarded`` and the server ends the stream.
    """

    def __init__(self, sealer: Sealer, client_id: str) -> None:
        self.sealer = sealer
        self.client_id = client_id
        self.confirmed = False  # a frame has opened: both ends hold the same keys
        self.discarded = False

    def seal(self, kind: int, round: int, step: int, plaintext: bytes) -> SealedLike:  # noqa: A002
        return self.sealer.seal(kind, round, step, plaintext)

    def open(  # noqa: A002
        self, kind: int, round: int, step: int, seq: int, ciphertext: bytes | memoryview
    ) -> bytes | memoryview:
        try:
            plaintext = self.sealer.open(kind, round, step, seq, ciphertext)
        except FrameError as exc:
            self.discarded = not self.confirmed
            log.warning(
                "security: client %s: %s refused%s: %s",
                self.client_id,
                kind_name(kind),
                "" if self.confirmed else " as the first frame of the session (session discarded)",
                exc,
            )
            raise ProtocolError(f"{type(exc).__name__}: {exc}", code=pb.UNAUTHENTICATED) from exc
        self.confirmed = True
        return plaintext


def session_discarded(session: ServerSession) -> bool:
    """True if the session's first frame failed to open (see `GuardedSealer`)."""
    return isinstance(session.sealer, GuardedSealer) and session.sealer.discarded


HandlerFor = Callable[[str], Handler]
"""``handler_for(client_id) -> handler`` for the sessions of that client (see `channel.Handler`)."""


class SessionFactory:
    """Turns a received ClientHello into the signed answer and the server's end of the session."""

    def __init__(self, verifier: HandshakeVerifier, handler_for: HandlerFor, run_id: str) -> None:
        self.verifier = verifier
        self.handler_for = handler_for
        self.run_id = check_identifier(run_id, "run_id", ValueError)

    def accept(self, message: pb.ClientHello) -> tuple[pb.ServerHello, ServerSession]:
        """Raise a `HandshakeError` (see `refusal_code`) or return (ServerHello, ServerSession).

        An unknown id, a wrong key and a bad signature are all answered with `NotAdmittedError`
        ("not admitted"); the reason and the admitted ids are written to the server's log only.
        """
        hello = client_hello_from_proto(message)
        try:
            server_hello, keys = self.verifier.accept(hello)
        except NOT_ADMITTED_ERRORS as exc:
            log.warning("security: refused: %s (admitted ids: %s)", exc, ", ".join(self.verifier.admitted_ids))
            raise NotAdmittedError(f"client {hello.client_id!r} is not admitted to this run") from exc
        if hello.run_id != self.run_id:  # the verifier checks this only if it was given a run id
            raise RunMismatchError(
                f"client {hello.client_id!r} asks to join run {hello.run_id!r}, this server runs {self.run_id!r}"
            )
        sealer = GuardedSealer(keys.session(Role.SERVER), hello.client_id)
        session = ServerSession(hello.client_id, self.handler_for(hello.client_id), sealer)
        log.info("client %s: session %s opened", hello.client_id, keys.session_id.hex())
        return server_hello_to_proto(server_hello, keys.session_id), session


# --- client side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What a client needs to open a session: its identity, the server's pinned key, the run."""

    identity: ed25519.Ed25519PrivateKey = field(repr=False)  # the client's Ed25519 identity key
    server_key: ed25519.Ed25519PublicKey  # pinned server identity key
    client_id: str  # as admitted on the server
    run_id: str  # the run to join
    config_hash: bytes  # `hash_run_config` of the run configuration, 32 bytes
    protocol_version: int = PROTOCOL_VERSION
    max_skew_s: float = DEFAULT_MAX_SKEW_S  # tolerated clock difference to the server
    config_sections: dict[str, bytes] = field(default_factory=dict)  # `hash_config_sections`, for mismatch reports

    def __post_init__(self) -> None:
        check_identifier(self.client_id, "client_id", ValueError)
        check_identifier(self.run_id, "run_id", ValueError)
        if not isinstance(self.identity, ed25519.Ed25519PrivateKey):
            raise TypeError(f"identity must be an Ed25519 private key, got {type(self.identity).__name__}")
        if not isinstance(self.server_key, ed25519.Ed25519PublicKey):
            raise TypeError(f"server_key must be an Ed25519 public key, got {type(self.server_key).__name__}")
        check_bytes(self.config_hash, HASH_LEN, "config_hash")


def _read_reply(reply_bytes: bytes) -> pb.Frame:
    frame = pb.Frame()
    try:
        frame.ParseFromString(reply_bytes)
    except DecodeError as exc:
        raise ProtocolError(f"malformed reply to CLIENT_HELLO ({exc})") from None
    if frame.kind == pb.ERROR:
        error = decode_payload(pb.ERROR, frame.body)
        raise HandshakeRefusedError(error.code, error.message)
    if frame.kind != pb.SERVER_HELLO:
        raise ProtocolError(f"CLIENT_HELLO was answered with {kind_name(frame.kind)}")
    return frame


def connect(transport: Transport, credentials: ClientCredentials) -> Channel:
    """Run the handshake over ``transport``; return a Channel sealed with the session keys.

    Raises `HandshakeRefusedError` (the server said no, with its ErrorCode), a `HandshakeError`
    (the server failed to authenticate), or the transport's own error. Closes ``transport`` on
    any failure.
    """
    try:
        return _handshake(transport, credentials)
    except BaseException:
        transport.close()
        raise


def _handshake(transport: Transport, credentials: ClientCredentials) -> Channel:
    started = client_hello(
        credentials.identity,
        credentials.run_id,
        credentials.client_id,
        credentials.config_hash,
        protocol_version=credentials.protocol_version,
        config_sections=credentials.config_sections,
    )
    body = client_hello_to_proto(started.hello).SerializeToString()
    frame = _read_reply(transport.exchange(hello_frame(pb.CLIENT_HELLO, body)))
    message = decode_payload(pb.SERVER_HELLO, frame.body)
    server_hello = server_hello_from_proto(message, public_key_raw(credentials.server_key))
    keys = finish_client(started, server_hello, credentials.server_key, credentials.max_skew_s)
    if not hmac.compare_digest(message.session_id.encode(), keys.session_id.hex().encode()):
        raise ServerAuthenticationError(
            f"server announced session id {message.session_id[:16]!r}, client {credentials.client_id!r} derived "
            f"{keys.session_id.hex()[:16]!r}: the two ends do not hold the same keys"
        )
    log.info("client %s: session %s established", credentials.client_id, keys.session_id.hex())
    return Channel(transport, keys.session(Role.CLIENT))

