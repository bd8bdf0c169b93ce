"""Authenticated ephemeral key agreement between one client and the server.

Implements the session set-up behind FL-GLM's "key encryption" (arXiv 2406.14898, Sec. 3): every
activation and gradient between a client and the server is encrypted with keys only that pair
holds, so a peer client that sees (or relays) the traffic cannot read it.

Two messages, SIGMA-style with signatures over the transcript:

1. ``ClientHello``: the client's fresh X25519 key, a 32-byte nonce, a timestamp, the run id, its
   client id and identity key, a hash of the run configuration and one hash per configuration
   section (so a refusal can name the sections that differ), signed with the client's Ed25519
   identity.
2. ``ServerHello``: the server's fresh X25519 key, nonce and timestamp, signed with the server's
   Ed25519 identity over the *whole* client hello plus these fields.

Keys: ``HKDF-SHA256(ikm = X25519(eph_c, eph_s), salt = SHA-256(transcript))`` expanded under three
distinct labels into a client->server key, a server->client key (AES-256-GCM, see
`fedsplit.security.aead`) and a session id. Ephemeral keys are new for every session, so a later
compromise of an identity key does not expose past traffic (forward secrecy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsplit.security.errors import (
    BadSignatureError,
    ConfigMismatchError,
    KeyAgreementError,
    KeyMismatchError,
    MalformedHandshakeError,
    ProtocolVersionError,
    RevokedError,
    RunMismatchError,
    ServerAuthenticationError,
    StaleHandshakeError,
    UnknownClientError,
)
from fedsplit.security.identity import fingerprint, public_key_raw
from fedsplit.security.replay import DEFAULT_REPLAY_CACHE_SIZE, DEFAULT_REPLAY_PER_CLIENT, ReplayGuard
from fedsplit.security.wire import (
    HASH_LEN,
    KEY_LEN,
    NONCE_LEN,
    PROTOCOL_VERSION,
    SIGNATURE_LEN,
    Role,
    check_bytes,
    check_identifier,
    check_timestamp,
    check_uint,
    encode_fields,
    f64,
    text,
    u32,
)

if TYPE_CHECKING:
    from fedsplit.security.aead import SecureSession

__all__ = [
    "DEFAULT_MAX_SKEW_S",
    "DEFAULT_REPLAY_CACHE_SIZE",
    "SESSION_ID_LEN",
    "ClientHello",
    "ServerHello",
    "SessionKeys",
    "ClientHandshake",
    "HandshakeVerifier",
    "ReplayGuard",
    "client_hello",
    "finish_client",
    "hash_run_config",
    "hash_config_sections",
]

DEFAULT_MAX_SKEW_S = 60.0
MAX_CONFIG_SECTIONS = 32
SESSION_ID_LEN = 16

LABEL_CLIENT_HELLO = b"fedsplit/v1/handshake/client-hello"
LABEL_SERVER_HELLO = b"fedsplit/v1/handshake/server-hello"
LABEL_TRANSCRIPT = b"fedsplit/v1/handshake/transcript"
LABEL_KEY_C2S = b"fedsplit/v1/key/client-to-server"
LABEL_KEY_S2C = b"fedsplit/v1/key/server-to-client"
LABEL_SESSION_ID = b"fedsplit/v1/session-id"
LABEL_RUN_CONFIG = b"fedsplit/v1/run-config"
LABEL_CONFIG_SECTIONS = b"fedsplit/v2/config-sections"

Clock = Callable[[], float]
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{64}")


def _short(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass


def _check_byte_fields(message: object, spec: Mapping[str, int]) -> None:
    """Check and normalise to ``bytes`` every fixed-length field; an empty signature means
    "not signed yet" and is left for signature verification to reject."""
    for name, length in spec.items():
        value = getattr(message, name)
        if name == "signature" and not value:
            continue
        _set(message, name, check_bytes(value, length, f"{type(message).__name__}.{name}"))


def _check_sections(value: object, what: str) -> dict[str, bytes]:
    """At most `MAX_CONFIG_SECTIONS` identifier names, each mapped to a 32-byte hash; sorted by name."""
    if not isinstance(value, Mapping):
        raise MalformedHandshakeError(f"{what}: expected a mapping of section name to hash, got {type(value).__name__}")
    if len(value) > MAX_CONFIG_SECTIONS:
        raise MalformedHandshakeError(f"{what}: expected at most {MAX_CONFIG_SECTIONS} sections, got {len(value)}")
    checked = {}
    for name in sorted(value):
        check_identifier(name, f"{what} name")
        checked[name] = check_bytes(value[name], HASH_LEN, f"{what}[{name!r}]")
    return checked


def _encode_sections(sections: Mapping[str, bytes]) -> bytes:
    pairs = [part for name in sorted(sections) for part in (text(name), sections[name])]
    return encode_fields(LABEL_CONFIG_SECTIONS, *pairs)


_CLIENT_HELLO_BYTES = {
    "identity_key": KEY_LEN,
    "ephemeral_key": KEY_LEN,
    "nonce": NONCE_LEN,
    "config_hash": HASH_LEN,
    "signature": SIGNATURE_LEN,
}
_SERVER_HELLO_BYTES = {
    "identity_key": KEY_LEN,
    "ephemeral_key": KEY_LEN,
    "nonce": NONCE_LEN,
    "signature": SIGNATURE_LEN,
}


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHello:
    """First handshake message, client -> server. Plain fields; the lead maps them to protobuf."""

    protocol_version: int  # u32
    run_id: str  # identifier, see `wire.check_identifier`
    client_id: str  # identifier
    identity_key: bytes  # raw Ed25519 public key, 32 bytes
    ephemeral_key: bytes  # raw X25519 public key, 32 bytes, fresh per session
    nonce: bytes  # 32 random bytes
    timestamp: float  # seconds since the epoch, client clock
    config_hash: bytes  # 32 bytes, see `hash_run_config`
    signature: bytes = b""  # Ed25519 over `transcript_bytes()`; empty while unsigned
    # one hash per configuration section (`hash_config_sections`): names the sections that differ
    config_sections: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_uint(self.protocol_version, 32, "ClientHello.protocol_version")
        check_identifier(self.run_id, "ClientHello.run_id")
        check_identifier(self.client_id, "ClientHello.client_id")
        _check_byte_fields(self, _CLIENT_HELLO_BYTES)
        _set(self, "timestamp", check_timestamp(self.timestamp, "ClientHello.timestamp"))
        _set(self, "config_sections", _check_sections(self.config_sections, "ClientHello.config_sections"))

    def transcript_bytes(self) -> bytes:
        """Canonical encoding of every field except the signature: what the client signs."""
        return encode_fields(
            LABEL_CLIENT_HELLO,
            u32(self.protocol_version),
            text(self.run_id),
            text(self.client_id),
            self.identity_key,
            self.ephemeral_key,
            self.nonce,
            f64(self.timestamp),
            self.config_hash,
            _encode_sections(self.config_sections),
        )


@dataclass(frozen=True)
class ServerHello:
    """Second handshake message, server -> client."""

    identity_key: bytes  # raw Ed25519 public key of the server (the client compares it to its pin)
    ephemeral_key: bytes  # raw X25519 public key, 32 bytes, fresh per session
    nonce: bytes  # 32 random bytes
    timestamp: float  # seconds since the epoch, server clock
    signature: bytes = b""  # Ed25519 over `transcript_bytes(client_hello)`

    def __post_init__(self) -> None:
        _check_byte_fields(self, _SERVER_HELLO_BYTES)
        _set(self, "timestamp", check_timestamp(self.timestamp, "ServerHello.timestamp"))

    def transcript_bytes(self, client_hello: ClientHello) -> bytes:
        """The signed client hello followed by the server's fields: what the server signs."""
        return encode_fields(
            LABEL_SERVER_HELLO,
            client_hello.transcript_bytes(),
            client_hello.signature,
            self.identity_key,
            self.ephemeral_key,
            self.nonce,
            f64(self.timestamp),
        )


def full_transcript(client_hello: ClientHello, server_hello: ServerHello) -> bytes:
    """Both hellos with both signatures; its SHA-256 is the HKDF salt."""
    return encode_fields(
        LABEL_TRANSCRIPT, server_hello.transcript_bytes(client_hello), server_hello.signature
    )


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    """What both ends derive from one handshake. Key bytes are kept out of ``repr``."""

    session_id: bytes  # 16 bytes; not secret once sent, but unpredictable before the handshake
    client_to_server: bytes = field(repr=False)  # AES-256-GCM key, 32 bytes
    server_to_client: bytes = field(repr=False)  # AES-256-GCM key, 32 bytes
    run_id: str
    client_id: str
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        check_bytes(self.session_id, SESSION_ID_LEN, "SessionKeys.session_id")
        check_bytes(self.client_to_server, KEY_LEN, "SessionKeys.client_to_server")
        check_bytes(self.server_to_client, KEY_LEN, "SessionKeys.server_to_client")

    def session(self, role: Role) -> SecureSession:
        """The frame sealer for ``role``: a client sends with the client->server key, and so on."""
        from fedsplit.security.aead import SecureSession

        client = Role(role) is Role.CLIENT
        return SecureSession(
            send_key=self.client_to_server if client else self.server_to_client,
            recv_key=self.server_to_client if client else self.client_to_server,
            run_id=self.run_id,
            client_id=self.client_id,
            role=Role(role),
            protocol_version=self.protocol_version,
        )


def _exchange(private: x25519.X25519PrivateKey, peer_raw: bytes, who: str) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError as exc:  # OpenSSL refuses the all-zero output of low-order points
        raise KeyAgreementError(
            f"X25519 with the ephemeral key of {who} failed (low-order public key?): {exc}"
        ) from exc


def _hkdf(shared: bytes, salt: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=label).derive(shared)


def derive_session_keys(shared: bytes, client: ClientHello, server: ServerHello) -> SessionKeys:
    """HKDF-SHA256 over the X25519 secret, salted with the transcript hash, one label per key."""
    salt = hashlib.sha256(full_transcript(client, server)).digest()
    return SessionKeys(
        session_id=_hkdf(shared, salt, LABEL_SESSION_ID, SESSION_ID_LEN),
        client_to_server=_hkdf(shared, salt, LABEL_KEY_C2S, KEY_LEN),
        server_to_client=_hkdf(shared, salt, LABEL_KEY_S2C, KEY_LEN),
        run_id=client.run_id,
        client_id=client.client_id,
        protocol_version=client.protocol_version,
    )


def hash_run_config(config: Mapping[str, object]) -> bytes:
    """SHA-256 of a run configuration (model, split points, adapter config, tokenizer, ...).

    Canonical JSON: sorted keys, no whitespace, ASCII only, no NaN. Both sides must pass the same
    mapping; values must be JSON types (str, int, float, bool, None, lists, nested mappings).
    """
    try:
        canonical = json.dumps(
            config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run configuration is not canonical JSON data: {exc}") from exc
    return hashlib.sha256(encode_fields(LABEL_RUN_CONFIG, canonical.encode("ascii"))).digest()


def hash_config_sections(sections: Mapping[str, object]) -> dict[str, bytes]:
    """One `hash_run_config` per top-level section: ``{"train": sha256(...), ...}``.

    Sent beside the overall hash so that a mismatch can be reported by section name (the values
    themselves never travel).
    """
    return {name: hash_run_config({name: value}) for name, value in sections.items()}


# --- server side -----------------------------------------------------------------------------


class HandshakeVerifier:
    """Checks client hellos against the admitted set and answers with a signed server hello.

    Checks run in this order, each with its own exception (all subclasses of `HandshakeError`):
    protocol version, client id admitted and key equal to the admitted key, signature, not revoked
    (by id or fingerprint), freshness, nonce not seen (and the identity's share of the replay
    cache not used up), run configuration hash (naming the sections that differ), run id. Nonces
    are recorded only after the signature verifies, so unauthenticated senders cannot fill the
    replay cache; revocation and the configuration are reported only to authenticated clients, so
    a stranger learns neither. The first three checks' errors are detailed for the server's log;
    the transport answers all of them with one "not admitted" (`NOT_ADMITTED_ERRORS`).
    """

    def __init__(
        self,
        server_identity: ed25519.Ed25519PrivateKey,
        admitted: Mapping[str, ed25519.Ed25519PublicKey],
        revoked: Collection[str],
        protocol_version: int,
        config_hash: bytes,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        clock: Clock = time.time,
        *,
        run_id: str | None = None,
        replay_cache_size: int = DEFAULT_REPLAY_CACHE_SIZE,
        replay_per_client: int = DEFAULT_REPLAY_PER_CLIENT,
        config_sections: Mapping[str, bytes] | None = None,
    ) -> None:
        self._identity = server_identity
        self._identity_raw = public_key_raw(server_identity.public_key())
        self._admitted = {
            check_identifier(cid, "admitted client id"): key for cid, key in admitted.items()
        }
        self._revoked_ids: frozenset[str] = frozenset()
        self._revoked_fingerprints: frozenset[str] = frozenset()
        for entry in revoked:
            self.revoke(entry)
        self._version = check_uint(protocol_version, 32, "protocol_version")
        self._config_hash = check_bytes(config_hash, HASH_LEN, "server config_hash")
        self._run_id = None if run_id is None else check_identifier(run_id, "server run_id")
        self._sections = _check_sections(config_sections or {}, "server config_sections")
        self._clock = clock
        # One identity holds at most replay_per_client live nonces: with the defaults (65,536 and
        # 256) one client, or any 255 of them, cannot fill the cache for the others.
        self._guard = ReplayGuard(max_skew_s, replay_cache_size, min(replay_per_client, replay_cache_size))

    @property
    def admitted_ids(self) -> list[str]:
        """The admitted client ids, sorted (for the server's own log, never for a refusal)."""
        return sorted(self._admitted)

    @property
    def replay_guard(self) -> ReplayGuard:
        return self._guard

    def revoke(self, client_id_or_fingerprint: str) -> None:
        """Refuse future handshakes by this client id or full key fingerprint.

        Existing sessions are not affected here: the caller must also drop them.
        """
        entry = client_id_or_fingerprint
        if _FINGERPRINT.fullmatch(entry):
            self._revoked_fingerprints = self._revoked_fingerprints | {entry.lower()}
        else:
            self._revoked_ids = self._revoked_ids | {entry}  # new frozenset: readers need no lock

    def accept(self, hello: ClientHello) -> tuple[ServerHello, SessionKeys]:
        """Verify ``hello``; return the signed `ServerHello` and the derived `SessionKeys`."""
        self._check_version(hello)
        key = self._admitted_key(hello)
        who = f"client {hello.client_id!r} (key {_short(hello.identity_key)})"
        self._check_signature(hello, key, who)
        self._check_not_revoked(hello.client_id, key, who)  # after the signature: only the key holder learns it
        now = self._clock()
        self._guard.admit(hello.nonce, hello.timestamp, now, who, identity=hello.client_id)
        self._check_config(hello, who)
        self._check_run(hello, who)
        return self._respond(hello, now, who)

    def _check_version(self, hello: ClientHello) -> None:
        if hello.protocol_version != self._version:
            raise ProtocolVersionError(
                f"client {hello.client_id!r} speaks protocol version {hello.protocol_version}, "
                f"this server speaks {self._version}; upgrade the older side"
            )

    def _admitted_key(self, hello: ClientHello) -> ed25519.Ed25519PublicKey:
        key = self._admitted.get(hello.client_id)
        if key is None:
            raise UnknownClientError(
                f"client {hello.client_id!r} (key {_short(hello.identity_key)}) is not admitted "
                f"to this run; add its public key to the server's admitted clients"
            )
        if not hmac.compare_digest(public_key_raw(key), hello.identity_key):
            raise KeyMismatchError(
                f"client {hello.client_id!r} presented key {_short(hello.identity_key)}, but the "
                f"admitted key for that id is {_short(public_key_raw(key))}: impersonation attempt "
                f"or an unannounced key rotation"
            )
        return key

    def _check_not_revoked(self, client_id: str, key: ed25519.Ed25519PublicKey, who: str) -> None:
        if client_id in self._revoked_ids or fingerprint(key) in self._revoked_fingerprints:
            raise RevokedError(f"{who} is revoked; issue a new key and admit it to reconnect")

    def _check_signature(self, hello: ClientHello, key: ed25519.Ed25519PublicKey, who: str) -> None:
        try:
            key.verify(hello.signature, hello.transcript_bytes())
        except InvalidSignature as exc:
            raise BadSignatureError(
                f"hello from {who} has an invalid signature: altered in transit or forged"
            ) from exc

    def _check_config(self, hello: ClientHello, who: str) -> None:
        if hmac.compare_digest(hello.config_hash, self._config_hash):
            return
        ours, theirs = self._sections, hello.config_sections
        differ = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
        if ours and theirs and differ:
            what = (
                f"the sections that differ: {', '.join(differ)} "
                f"(make them equal on both sides; `fedsplit config` prints every field)"
            )
        elif ours and theirs:
            what = "every section hash agrees, but the overall hash does not (a client or server bug)"
        else:
            what = "model, split points, adapter, training, federation or tokenizer settings differ"
        raise ConfigMismatchError(
            f"configuration mismatch for {who}: client run-config hash "
            f"{hello.config_hash.hex()[:16]} != server {self._config_hash.hex()[:16]}; {what}"
        )

    def _check_run(self, hello: ClientHello, who: str) -> None:
        if self._run_id is not None and hello.run_id != self._run_id:
            raise RunMismatchError(
                f"{who} asks to join run {hello.run_id!r}, but this server runs {self._run_id!r}"
            )

    def _respond(self, hello: ClientHello, now: float, who: str) -> tuple[ServerHello, SessionKeys]:
        ephemeral = x25519.X25519PrivateKey.generate()
        unsigned = ServerHello(
            identity_key=self._identity_raw,
            ephemeral_key=ephemeral.public_key().public_bytes_raw(),
            nonce=os.urandom(NONCE_LEN),
            timestamp=now,
        )
        signature = self._identity.sign(unsigned.transcript_bytes(hello))
        signed = dataclasses.replace(unsigned, signature=signature)
        shared = _exchange(ephemeral, hello.ephemeral_key, who)
        return signed, derive_session_keys(shared, hello, signed)


# --- client side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHandshake:
    """A sent `ClientHello` and the ephemeral secret needed to finish it. Use once, then drop."""

    hello: ClientHello
    ephemeral_private: x25519.X25519PrivateKey = field(repr=False)


def client_hello(
    identity: ed25519.Ed25519PrivateKey,
    run_id: str,
    client_id: str,
    config_hash: bytes,
    protocol_version: int = PROTOCOL_VERSION,
    clock: Clock = time.time,
    config_sections: Mapping[str, bytes] | None = None,
) -> ClientHandshake:
    """Build and sign a `ClientHello` with a fresh ephemeral key and nonce."""
    ephemeral = x25519.X25519PrivateKey.generate()
    unsigned = ClientHello(
        protocol_version=protocol_version,
        run_id=run_id,
        client_id=client_id,
        identity_key=public_key_raw(identity.public_key()),
        ephemeral_key=ephemeral.public_key().public_bytes_raw(),
        nonce=os.urandom(NONCE_LEN),
        timestamp=clock(),
        config_hash=config_hash,
        config_sections=dict(config_sections or {}),
    )
    signed = dataclasses.replace(unsigned, signature=identity.sign(unsigned.transcript_bytes()))
    return ClientHandshake(hello=signed, ephemeral_private=ephemeral)


def finish_client(
    handshake: ClientHandshake,
    server_hello: ServerHello,
    pinned_server_key: ed25519.Ed25519PublicKey,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    clock: Clock = time.time,
) -> SessionKeys:
    """Check the server's answer against the pinned key and freshness; derive the session keys."""
    hello = handshake.hello
    who = f"server answering client {hello.client_id!r}"
    pinned_raw = public_key_raw(pinned_server_key)
    if not hmac.compare_digest(server_hello.identity_key, pinned_raw):
        raise ServerAuthenticationError(
            f"{who} presented key {_short(server_hello.identity_key)}, but the pinned server key "
            f"is {_short(pinned_raw)}: possible man in the middle, or the server key was rotated"
        )
    try:
        pinned_server_key.verify(server_hello.signature, server_hello.transcript_bytes(hello))
    except InvalidSignature as exc:
        raise ServerAuthenticationError(
            f"{who}: signature does not verify under the pinned key {_short(pinned_raw)}; "
            f"the reply was altered or does not belong to this hello"
        ) from exc
    _check_server_fresh(server_hello.timestamp, clock(), max_skew_s, who)
    shared = _exchange(handshake.ephemeral_private, server_hello.ephemeral_key, "the server")
    return derive_session_keys(shared, hello, server_hello)


def _check_server_fresh(timestamp: float, now: float, max_skew_s: float, who: str) -> None:
    if abs(now - timestamp) > max_skew_s:
        raise StaleHandshakeError(
            f"{who}: server timestamp {timestamp:.3f} differs from the client clock by "
            f"{now - timestamp:+.1f}s, limit {max_skew_s:.0f}s (clock skew or delayed replay)"
        )
