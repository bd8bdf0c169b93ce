"""Exceptions raised by `fedsplit.security`.

FL-GLM (arXiv 2406.14898) protects the activations and gradients a client exchanges with the server
with keys only that pair holds. Every check in this package that can fail raises one of the classes
below; each message states what was wrong and for whom (client id, key fingerprint), so an operator
can act on a log line without a debugger. Catch `HandshakeError` or `FrameError` to map a whole
family to one transport status (for example gRPC ``UNAUTHENTICATED``).
"""

from __future__ import annotations

__all__ = [
    "SecurityError",
    "KeyFileError",
    "InsecureKeyFileError",
    "CertificateError",
    "ServerCertificateError",
    "HandshakeError",
    "MalformedHandshakeError",
    "ProtocolVersionError",
    "UnknownClientError",
    "NotAdmittedError",
    "KeyMismatchError",
    "RevokedError",
    "BadSignatureError",
    "StaleHandshakeError",
    "ReplayedHelloError",
    "ReplayCacheFullError",
    "ConfigMismatchError",
    "RunMismatchError",
    "ServerAuthenticationError",
    "KeyAgreementError",
    "FrameError",
    "AuthenticationError",
    "ReplayError",
    "SessionExhaustedError",
    "InsecureTransportWarning",
]


class SecurityError(Exception):
    """Base class of every error raised by `fedsplit.security`."""


# --- key files and certificates --------------------------------------------------------------


class KeyFileError(SecurityError):
    """A key or certificate file is missing, malformed, of the wrong type, or already exists."""


class InsecureKeyFileError(KeyFileError):
    """A private key file is readable or writable by group or others."""


class CertificateError(SecurityError):
    """TLS material is inconsistent: key does not match certificate, expired, or not a CA."""


class ServerCertificateError(CertificateError):
    """The server's TLS certificate does not name the host the client dials, or is not issued by
    the pinned CA: reconnecting cannot fix it, the certificate (or the address) must change."""


# --- handshake -------------------------------------------------------------------------------


class HandshakeError(SecurityError):
    """The authenticated key agreement failed; no session keys were derived."""


class MalformedHandshakeError(HandshakeError, ValueError):
    """A hello message has a field of the wrong type, length or range."""


class ProtocolVersionError(HandshakeError):
    """The peer speaks a different protocol version."""


class UnknownClientError(HandshakeError):
    """The client id is not in the server's admitted set."""


class NotAdmittedError(HandshakeError):
    """What a refused stranger is told: unknown id, wrong key or bad signature, all alike.

    The detailed reason (`UnknownClientError`, `KeyMismatchError`, `BadSignatureError`) goes to
    the server's log only, so a refusal does not reveal which ids are admitted.
    """


class KeyMismatchError(HandshakeError):
    """The client id is admitted, but with a different identity key."""


class RevokedError(HandshakeError):
    """The client id or its key fingerprint has been revoked."""


class BadSignatureError(HandshakeError):
    """The hello signature does not verify under the admitted identity key."""


class StaleHandshakeError(HandshakeError):
    """The hello timestamp is outside the freshness window (too old or in the future)."""


class ReplayedHelloError(HandshakeError):
    """A hello with this nonce was already accepted within the freshness window."""


class ReplayCacheFullError(HandshakeError):
    """Too many handshakes inside one freshness window; the server fails closed."""


class ConfigMismatchError(HandshakeError):
    """Client and server disagree on the run configuration (model, split, adapters, tokenizer)."""


class RunMismatchError(HandshakeError):
    """The hello names a different run id than the one this server is running."""


class ServerAuthenticationError(HandshakeError):
    """The server hello is not signed by the pinned server key (possible man in the middle)."""


class KeyAgreementError(HandshakeError):
    """X25519 produced an all-zero secret (a low-order public key was supplied)."""


# --- sealed frames ---------------------------------------------------------------------------


class FrameError(SecurityError):
    """A sealed frame was rejected; the session's receive state is unchanged."""


class AuthenticationError(FrameError):
    """The AES-GCM tag does not verify: tampered bytes, wrong context, or wrong session."""


class ReplayError(FrameError):
    """The frame's sequence number is not above the last accepted one (replay or reordering)."""


class SessionExhaustedError(FrameError):
    """The per-direction sequence space of the session is used up; run a new handshake."""


# --- warnings --------------------------------------------------------------------------------


class InsecureTransportWarning(UserWarning):
    """The transport runs without TLS; only the AEAD layer protects frame contents."""
