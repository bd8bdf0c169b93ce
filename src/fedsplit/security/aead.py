"""Sealing of hidden states and gradients with the per-session AES-256-GCM keys.

FL-GLM (arXiv 2406.14898, Sec. 3) encrypts every activation and gradient exchanged between a
client and the server with keys only that pair holds. `SecureSession` is that encryption for one
side of one session (keys from `fedsplit.security.handshake`).

Per frame:

* nonce (12 bytes) = ``direction (u32) || seq (u64)``, big-endian. Each direction has its own key
  and its own counter starting at 0, so a (key, nonce) pair is never used twice.
* associated data = ``encode_fields("fedsplit/v1/frame", version, run_id, client_id)`` followed by
  ``direction (u8) || kind (u32) || round (u64) || step (u64) || seq (u64)``. A frame therefore
  opens only in the session, direction and protocol slot (kind, round, step) it was sealed for.
* receive side: ``seq`` must be strictly greater than the last accepted one (gaps are allowed, so
  a frame lost in transit does not end the session). A rejected frame changes nothing.

Ciphertext is ``AES-GCM(plaintext) || 16-byte tag``; the caller sends ``seq`` next to it.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsplit.security.errors import AuthenticationError, ReplayError, SessionExhaustedError
from fedsplit.security.wire import (
    KEY_LEN,
    PROTOCOL_VERSION,
    Direction,
    Role,
    check_identifier,
    check_uint,
    encode_fields,
    text,
    u32,
)

__all__ = ["TAG_LEN", "MAX_FRAMES_PER_DIRECTION", "Sealed", "SecureSession"]

TAG_LEN = 16
# Rekey (new handshake) long before AES-GCM's data limits; at 10 MB per frame this is ~40 PB.
MAX_FRAMES_PER_DIRECTION = 2**32
LABEL_FRAME = b"fedsplit/v1/frame"
_IN_PLACE_PIECE = 1 << 20  # bytes decrypted per update_into call
_NONCE = struct.Struct(">IQ")  # direction, seq -> 12 bytes
_AAD_TAIL = struct.Struct(">BIQQQ")  # direction, kind, round, step, seq

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Sealed:
    """One sealed frame: send both fields; ``ciphertext`` ends with the 16-byte GCM tag."""

    seq: int
    ciphertext: bytes


class SecureSession:
    """Seals outgoing and opens incoming frames for one side of one client-server session.

    Thread-safe: sequence numbers are reserved under a lock, and a frame is accepted only if its
    sequence number is still above the last accepted one after decryption.
    """

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        run_id: str,
        client_id: str,
        role: Role,
        protocol_version: int = PROTOCOL_VERSION,
        max_frames: int = MAX_FRAMES_PER_DIRECTION,
    ) -> None:
        _check_keys(send_key, recv_key)
        self._role = Role(role)
        self._client_id = check_identifier(client_id, "client_id", ValueError)
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._recv_key = bytes(recv_key)
        self._out = Direction.outgoing(self._role)
        self._in = Direction.incoming(self._role)
        self._aad_head = encode_fields(
            LABEL_FRAME,
            u32(check_uint(protocol_version, 32, "protocol_version", ValueError)),
            text(check_identifier(run_id, "run_id", ValueError)),
            text(self._client_id),
        )
        self._max_frames = check_uint(max_frames, 64, "max_frames", ValueError)
        self._lock = threading.Lock()
        self._next_send = 0
        self._last_recv = -1

    def __repr__(self) -> str:
        return (
            f"SecureSession(client_id={self._client_id!r}, role={self._role.value}, "
            f"next_send_seq={self._next_send}, last_received_seq={self._last_recv})"
        )

    @property
    def next_send_seq(self) -> int:
        return self._next_send

    @property
    def last_received_seq(self) -> int:
        """-1 until the first frame is accepted."""
        return self._last_recv

    def seal(self, kind: int, round: int, step: int, plaintext: Buffer) -> Sealed:  # noqa: A002
        """Encrypt ``plaintext`` (any contiguous buffer, not copied) for the peer."""
        _check_slot(kind, round, step, ValueError)
        seq = self._reserve_seq()
        aad = self._aad(self._out, kind, round, step, seq)
        return Sealed(seq, self._send.encrypt(_NONCE.pack(self._out, seq), plaintext, aad))

    def open(  # noqa: A003
        self, kind: int, round: int, step: int, seq: int, ciphertext: Buffer  # noqa: A002
    ) -> bytes | memoryview:
        """Decrypt a frame from the peer, or raise `ReplayError` / `AuthenticationError`.

        The receive counter moves only when a frame is accepted.
        """
        _check_slot(kind, round, step, AuthenticationError)
        check_uint(seq, 64, "frame seq", AuthenticationError)
        self._check_fresh(seq)
        aad = self._aad(self._in, kind, round, step, seq)
        try:
            if isinstance(ciphertext, memoryview) and not ciphertext.readonly:
                plaintext: bytes | memoryview = self._open_in_place(_NONCE.pack(self._in, seq), ciphertext, aad)
            else:
                plaintext = self._recv.decrypt(_NONCE.pack(self._in, seq), ciphertext, aad)
        except InvalidTag as exc:
            raise AuthenticationError(self._describe_failure(kind, round, step, seq)) from exc
        self._accept(seq)
        return plaintext

    def _open_in_place(self, nonce: bytes, view: memoryview, aad: bytes) -> memoryview:
        """Decrypt ``view`` (ciphertext || tag) over itself; the plaintext is ``view[:-16]``.

        A large frame (reassembled from chunks into one buffer) then costs no second copy, and a
        junk one is refused at the tag having cost nothing but its buffer. The caller must not use
        the buffer if this raises ``InvalidTag``.
        """
        if len(view) < TAG_LEN:
            raise InvalidTag
        size = len(view) - TAG_LEN
        tag = bytes(view[size:])
        decryptor = Cipher(algorithms.AES(self._recv_key), modes.GCM(nonce)).decryptor()
        decryptor.authenticate_additional_data(aad)
        for start in range(0, size, _IN_PLACE_PIECE):
            stop = min(size, start + _IN_PLACE_PIECE)
            # update_into wants room for a block beyond the input; the tag's 16 bytes provide it.
            decryptor.update_into(view[start:stop], view[start : stop + 15])
        decryptor.finalize_with_tag(tag)
        return view[:size]

    # --- internals -------------------------------------------------------------------------

    def _aad(self, direction: Direction, kind: int, round: int, step: int, seq: int) -> bytes:
        return self._aad_head + _AAD_TAIL.pack(direction, kind, round, step, seq)

    def _reserve_seq(self) -> int:
        with self._lock:
            seq = self._next_send
            if seq >= self._max_frames:
                raise SessionExhaustedError(
                    f"session of client {self._client_id!r} ({self._role.value} side) has sent "
                    f"{seq} frames, the limit per key; run a new handshake"
                )
            self._next_send = seq + 1
            return seq

    def _check_fresh(self, seq: int) -> None:
        last = self._last_recv
        if seq <= last:
            raise ReplayError(
                f"frame {self._in.name.lower()} for client {self._client_id!r} has seq {seq}, "
                f"not above the last accepted {last}: replayed or reordered"
            )

    def _accept(self, seq: int) -> None:
        with self._lock:  # another thread may have accepted a later frame meanwhile
            self._check_fresh(seq)
            self._last_recv = seq

    def _describe_failure(self, kind: int, round: int, step: int, seq: int) -> str:
        return (
            f"frame {self._in.name.lower()} for client {self._client_id!r} (kind={kind}, "
            f"round={round}, step={step}, seq={seq}) failed authentication: bytes were altered, "
            f"kind/round/step do not match what was sealed, or it was sealed for another "
            f"client or session"
        )


def _check_keys(send_key: bytes, recv_key: bytes) -> None:
    for name, key in (("send_key", send_key), ("recv_key", recv_key)):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
            raise ValueError(f"{name} must be {KEY_LEN} bytes (AES-256)")
    if send_key == recv_key:
        raise ValueError("send_key and recv_key must differ: one key per direction")


def _check_slot(kind: int, round: int, step: int, error: type[Exception]) -> None:  # noqa: A002
    check_uint(kind, 32, "frame kind", error)
    check_uint(round, 64, "frame round", error)
    check_uint(step, 64, "frame step", error)

