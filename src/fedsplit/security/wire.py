"""Protocol constants and the canonical byte encoding shared by the handshake and frame sealing.

Everything that is signed, hashed or used as AES-GCM associated data in FL-GLM's key-encryption
layer (arXiv 2406.14898, Sec. 3) is encoded here, in exactly one way: a domain label followed by
length-prefixed fields. Length prefixes make the encoding injective (no two field lists share a
byte string) and domain labels keep a signature or hash made for one purpose from being accepted
for another.
"""

from __future__ import annotations

import enum
import math
import re
import struct

from fedsplit.security.errors import MalformedHandshakeError

__all__ = [
    "PROTOCOL_VERSION",
    "KEY_LEN",
    "NONCE_LEN",
    "SIGNATURE_LEN",
    "HASH_LEN",
    "MAX_U64",
    "Role",
    "Direction",
    "encode_fields",
    "u8",
    "u32",
    "u64",
    "f64",
    "text",
    "check_identifier",
    "check_bytes",
    "check_timestamp",
    "check_uint",
]

PROTOCOL_VERSION = 3  # (= fedsplit.proto) 2: per-section config hashes in the hello; 3: data reports, EVAL_REPORT,
# Agg*, GENERATE_*

KEY_LEN = 32  # raw Ed25519 / X25519 public keys, AES-256 keys
NONCE_LEN = 32  # handshake nonces
SIGNATURE_LEN = 64  # Ed25519
HASH_LEN = 32  # SHA-256
MAX_U64 = 2**64 - 1

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Role(enum.Enum):
    """Which end of a client-server pair a session object lives on."""

    CLIENT = "client"
    SERVER = "server"


class Direction(enum.IntEnum):
    """Direction of a frame; each direction has its own key and sequence counter."""

    CLIENT_TO_SERVER = 1
    SERVER_TO_CLIENT = 2

    @classmethod
    def outgoing(cls, role: Role) -> Direction:
        return cls.CLIENT_TO_SERVER if role is Role.CLIENT else cls.SERVER_TO_CLIENT

    @classmethod
    def incoming(cls, role: Role) -> Direction:
        return cls.SERVER_TO_CLIENT if role is Role.CLIENT else cls.CLIENT_TO_SERVER


def encode_fields(label: bytes, *fields: bytes) -> bytes:
    """``len(label) || label || len(f1) || f1 || ...`` with 4-byte big-endian lengths."""
    parts = [struct.pack(">I", len(label)), label]
    for field in fields:
        parts.append(struct.pack(">I", len(field)))
        parts.append(field)
    return b"".join(parts)


def u8(value: int) -> bytes:
    return struct.pack(">B", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def f64(value: float) -> bytes:
    """IEEE-754 binary64, big-endian: survives a protobuf ``double`` round trip bit for bit."""
    return struct.pack(">d", value)


def text(value: str) -> bytes:
    return value.encode("utf-8")


def check_identifier(
    value: object, what: str, error: type[Exception] = MalformedHandshakeError
) -> str:
    """Run ids, client ids and key names: 1-128 chars of ``[A-Za-z0-9._-]``, not starting with
    ``.`` or ``-``. They end up in file names, log lines and associated data, so no separators,
    no whitespace, no path traversal."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise error(
            f"{what} must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit, "
            f"got {value!r}"
        )
    return value


def check_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise MalformedHandshakeError(f"{what} must be {length} bytes, got {type(value).__name__}")
    if len(value) != length:
        raise MalformedHandshakeError(f"{what} must be exactly {length} bytes, got {len(value)}")
    return bytes(value)


def check_timestamp(value: object, what: str) -> float:
    # NaN compares false with everything, so a NaN timestamp would pass any freshness window.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedHandshakeError(f"{what} must be a finite number of seconds, got {value!r}")
    return float(value)


def check_uint(
    value: object, bits: int, what: str, error: type[Exception] = MalformedHandshakeError
) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise error(f"{what} must be an integer in [0, 2**{bits}), got {value!r}")
    return value
