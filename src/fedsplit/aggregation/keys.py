"""Client-to-client keys relayed by the server: signed X25519 adverts, pairwise keys, mask PRG, sealing.

Secure aggregation (Bonawitz et al. 2017) and the CKKS key hand-off both need clients to agree on
keys *through* the server. Each client signs its fresh X25519 public keys with its long-term Ed25519
identity (`fedsplit.security.identity`); peers verify the signature against the identity key they
already know (the run's admitted list), so the relaying server cannot substitute its own keys and
sit in the middle. Pairwise keys are ``HKDF-SHA256(X25519(a, B))`` bound to the run, the round, the
purpose and both client ids.

Masks are expanded from full 256-bit seeds with the ChaCha20 keystream (RFC 7539, from
``cryptography``): ``8 * m`` keystream bytes read as ``m`` little-endian uint64 ring elements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsplit.aggregation.errors import MalformedMessageError
from fedsplit.security.wire import check_identifier, encode_fields, text, u64

__all__ = [
    "KeyPair",
    "SignedKeys",
    "sign_keys",
    "verify_keys",
    "pairwise_key",
    "expand_mask",
    "seal",
    "open_sealed",
    "x25519_public_raw",
]

SEED_LEN = 32
_GCM_NONCE_LEN = 12
_PRG_NONCE = {"self": b"fedsplit-selfmsk", "pair": b"fedsplit-pairmsk"}  # 16 bytes each


@dataclass(frozen=True)
class KeyPair:
    """A fresh X25519 key pair (private key kept by its owner, never serialized)."""

    private: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(x25519.X25519PrivateKey.generate())

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes_raw()


def x25519_public_raw(private_raw: bytes) -> bytes:
    """The public key of a raw 32-byte X25519 private key (used to verify a reconstructed secret)."""
    return x25519.X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes_raw()


@dataclass(frozen=True)
class SignedKeys:
    """A client's public keys for one round and purpose, signed with its Ed25519 identity."""

    client_id: str
    purpose: str  # "secagg" or "ckks"
    round: int
    keys: tuple[bytes, ...]  # raw X25519 public keys and commitments, meaning fixed by the purpose
    signature: bytes

    def signed_bytes(self, run_id: str) -> bytes:
        return _advert_bytes(run_id, self.client_id, self.purpose, self.round, self.keys)


def sign_keys(
    identity: ed25519.Ed25519PrivateKey, run_id: str, client_id: str, purpose: str, round: int, keys: tuple[bytes, ...]
) -> SignedKeys:
    check_identifier(client_id, "client id", ValueError)
    signature = identity.sign(_advert_bytes(run_id, client_id, purpose, round, keys))
    return SignedKeys(client_id=client_id, purpose=purpose, round=round, keys=keys, signature=signature)


def verify_keys(
    advert: SignedKeys, identity: ed25519.Ed25519PublicKey, run_id: str, purpose: str, round: int, count: int
) -> None:
    """Raise `MalformedMessageError` naming the client unless ``advert`` is its signed keys for this round."""
    who = f"client {advert.client_id!r}"
    if advert.purpose != purpose or advert.round != round:
        raise MalformedMessageError(
            f"{who}: expected keys for {purpose!r} round {round}, got {advert.purpose!r} round {advert.round}"
        )
    if len(advert.keys) != count or any(len(key) != 32 for key in advert.keys):
        raise MalformedMessageError(f"{who}: expected {count} keys of 32 bytes, got {[len(k) for k in advert.keys]}")
    try:
        identity.verify(advert.signature, advert.signed_bytes(run_id))
    except InvalidSignature as exc:
        raise MalformedMessageError(f"{who}: the signature over its keys does not verify with its identity") from exc


def _advert_bytes(run_id: str, client_id: str, purpose: str, round: int, keys: tuple[bytes, ...]) -> bytes:
    label = b"fedsplit/aggregation/keys/v1"
    return encode_fields(label, text(run_id), text(client_id), text(purpose), u64(round), *keys)


def pairwise_key(
    private: x25519.X25519PrivateKey, peer_public: bytes, *, run_id: str, purpose: str, round: int, ids: tuple[str, str]
) -> bytes:
    """32 bytes both ends derive: HKDF(X25519) bound to run, purpose, round and the (unordered) pair."""
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero shared secret: a low-order point, never from an honest peer
        raise MalformedMessageError(f"key agreement with {ids} failed: {exc}") from exc
    low, high = sorted(ids)
    label = b"fedsplit/aggregation/pairwise/v1"
    info = encode_fields(label, text(run_id), text(purpose), u64(round), text(low), text(high))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def expand_mask(seed: bytes, count: int, kind: str) -> np.ndarray:
    """``count`` uint64 values of the ChaCha20 keystream under the 256-bit ``seed`` (``kind``: self | pair)."""
    if len(seed) != SEED_LEN:
        raise ValueError(f"expected a {SEED_LEN}-byte seed, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE[kind]), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)  # (count,)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag`` with a random 96-bit nonce (keys are single-use)."""
    nonce = os.urandom(_GCM_NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, who: str) -> bytes:
    """Inverse of `seal`; raises `MalformedMessageError` naming ``who`` on any failure."""
    if len(sealed) < _GCM_NONCE_LEN + 16:
        raise MalformedMessageError(f"{who}: sealed message too short ({len(sealed)} bytes)")
    try:
        return AESGCM(key).decrypt(sealed[:_GCM_NONCE_LEN], sealed[_GCM_NONCE_LEN:], associated)
    except InvalidTag as exc:
        raise MalformedMessageError(f"{who}: sealed message does not authenticate (tampered or wrong key)") from exc
