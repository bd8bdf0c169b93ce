"""CKKS homomorphic aggregation with TenSEAL (Cheon et al. 2017; the HE-FL scheme of arXiv 2503.12226).

Clients encrypt their pre-weighted updates ``[w x ..., w]`` (packed ``poly_degree / 2`` values per
ciphertext, any length: the vector is cut into blocks, encrypted block-wise in parallel); the server
only adds ciphertexts under a *keyless* context (parameters only: it can neither decrypt nor
encrypt) and returns the encrypted sum; the clients decrypt it and divide by the summed weight.
Encryption is symmetric (secret-key) CKKS: every client holds the secret key anyway, and it is
twice as fast as public-key encryption. Message flow::

    key holder h          server (keyless context only)           client c
      <--------------------SignedKeys(X25519 pk_c), signed by c's identity--------
      --SealedKey(AES-GCM_{HKDF(X25519(h, c))}(secret context))--> relay -------->  open, load
      --keyless context (no secret or public key)--> keep
                          <--CkksUpload(blocks, context id, Ed25519 signature)--  every client
      verify signature + context id, exclude bad uploads, add the rest
                          --CkksSum(blocks)-->                                    decrypt, / sum w

Threat model (see docs/aggregation.md): the server sees ciphertexts only, so an honest-but-curious
server learns nothing about any single update, nor about the sum; it can drop uploads (it names
them) but cannot forge one (each upload is signed over its ciphertext bytes by the client's
Ed25519 identity and bound to the round and the context). All clients share ONE secret key, so a
client colluding with the server learns everything: the server hands it any individual upload and
it decrypts it. CKKS is therefore only as private as the least trustworthy client; use secure
aggregation (``mode = "secagg"``) when clients may collude with the server. Results are approximate
(CKKS): with scale ``2^40`` the relative error of the decrypted average is about ``1e-9``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.aggregation.errors import MalformedMessageError, ProtocolStageError, RoundAbortedError
from fedsplit.aggregation.keys import KeyPair, SignedKeys, open_sealed, pairwise_key, seal, sign_keys, verify_keys
from fedsplit.security.wire import encode_fields, text, u64

__all__ = [
    "CkksParams",
    "SealedKey",
    "CkksUpload",
    "CkksSum",
    "CkksKeyHolder",
    "CkksClient",
    "CkksServer",
    "key_id",
]

PURPOSE = "ckks"
_MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # 128-bit security (HE standard)


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters every party agrees on."""

    poly_degree: int = 8192  # ring dimension N; poly_degree / 2 values per ciphertext
    scale_bits: int = 40  # encoding scale 2^scale_bits: precision of the decrypted sum
    workers: int = 1  # threads encrypting blocks in parallel (1 = serial; see bench/private_aggregation.py)
    executor: Literal["thread", "process"] = "thread"
    max_clients: int = 256  # the sum of this many uploads must fit: |value| < 2^(59 - scale_bits) / max_clients

    def __post_init__(self) -> None:
        if self.poly_degree not in _MAX_COEFF_BITS:
            raise ValueError(f"poly_degree: expected one of {sorted(_MAX_COEFF_BITS)}, got {self.poly_degree!r}")
        if not 20 <= self.scale_bits <= 50:
            raise ValueError(f"scale_bits: expected 20..50, got {self.scale_bits!r}")
        if self.max_clients < 1:
            raise ValueError(f"max_clients: expected >= 1, got {self.max_clients!r}")
        if sum(self.coeff_bits) > _MAX_COEFF_BITS[self.poly_degree]:
            raise ValueError(
                f"scale_bits: {self.coeff_bits} sums to {sum(self.coeff_bits)} bits, over the 128-bit-security "
                f"limit {_MAX_COEFF_BITS[self.poly_degree]} of poly_degree {self.poly_degree}"
            )
        if self.workers < 1:
            raise ValueError(f"workers: expected >= 1, got {self.workers!r}")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor: expected thread or process, got {self.executor!r}")

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def coeff_bits(self) -> tuple[int, ...]:
        # Additions need no rescaling: one 60-bit data prime (values up to 2^(59 - scale_bits)) and the
        # 60-bit special prime. Ciphertexts are half the size of (60, scale, 60) at the same precision.
        return (60, 60)

    @property
    def max_abs(self) -> float:
        """Largest |value| one client may encrypt so that the sum of ``max_clients`` uploads cannot wrap."""
        return 2.0 ** (59 - self.scale_bits) / self.max_clients

    def num_blocks(self, length: int) -> int:
        return max(1, math.ceil(length / self.slots))


@dataclass(frozen=True)
class SealedKey:
    """The secret CKKS context, sealed by the key holder for one client (the server relays it)."""

    holder: str
    recipient: str
    sealed: bytes


@dataclass(frozen=True)
class CkksUpload:
    client_id: str
    round: int
    key: bytes  # key_id of the secret key the blocks were encrypted under
    blocks: tuple[bytes, ...]  # serialized CKKS vectors, ``slots`` values each (the last may be shorter)
    signature: bytes  # Ed25519 over run, round, client, context and every block's SHA-256

    @property
    def nbytes(self) -> int:
        return len(self.client_id) + len(self.key) + len(self.signature) + sum(len(b) + 4 for b in self.blocks) + 16


@dataclass(frozen=True)
class CkksSum:
    """The encrypted sum the server returns to the clients, and who is in it."""

    blocks: tuple[bytes, ...]
    clients: list[str]
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(b) + 4 for b in self.blocks)


def key_id(secret_context: bytes) -> bytes:
    """SHA-256 of the serialized secret context: names the key (uploads under another key are refused)."""
    return hashlib.sha256(b"fedsplit/ckks/key/v1" + secret_context).digest()


def _key_ad(run_id: str, round: int, holder: str, recipient: str) -> bytes:
    return encode_fields(b"fedsplit/ckks/sealed-key/v1", text(run_id), u64(round), text(holder), text(recipient))


def _upload_bytes(run_id: str, round: int, client_id: str, key: bytes, blocks: Sequence[bytes]) -> bytes:
    digests = [hashlib.sha256(block).digest() for block in blocks]
    return encode_fields(b"fedsplit/ckks/upload/v1", text(run_id), u64(round), text(client_id), key, *digests)


class CkksKeyHolder:
    """The client that creates the CKKS keys and hands the secret context to its peers, sealed end to end."""

    def __init__(
        self, client_id: str, identity: ed25519.Ed25519PrivateKey, peers: Mapping[str, ed25519.Ed25519PublicKey],
        params: CkksParams, *, run_id: str, round: int,
    ) -> None:
        import tenseal as ts

        self.client_id, self.params, self.run_id, self.round = client_id, params, run_id, round
        self._identity, self._peers = identity, dict(peers)
        self._ephemeral = KeyPair.generate()
        # Symmetric (secret-key) encryption: every client holds the secret key anyway, it encrypts twice as
        # fast as public-key encryption, and the server, holding no encryption key at all, cannot forge uploads.
        context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_degree,
                             coeff_mod_bit_sizes=list(params.coeff_bits),
                             encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        context.global_scale = 2.0**params.scale_bits
        self._secret = context.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                                         save_relin_keys=False)
        self.public_context = _public_bytes(context)  # for the server
        self.key_id = key_id(self._secret)  # for the server: names the key without revealing it

    def advertise(self) -> SignedKeys:
        keys = (self._ephemeral.public_raw,)
        return sign_keys(self._identity, self.run_id, self.client_id, PURPOSE, self.round, keys)

    def seal_for(self, adverts: Sequence[SignedKeys]) -> tuple[list[SealedKey], dict[str, str]]:
        """A sealed secret context per verified peer advert; adverts that fail are returned by client id."""
        sealed, refused = [], {}
        for advert in adverts:
            cid = advert.client_id
            if cid == self.client_id:
                continue
            try:
                if cid not in self._peers:
                    raise MalformedMessageError(f"advert from unknown client {cid!r}")
                verify_keys(advert, self._peers[cid], self.run_id, PURPOSE, self.round, 1)
            except MalformedMessageError as exc:
                refused[cid] = str(exc)
                continue
            key = pairwise_key(self._ephemeral.private, advert.keys[0], run_id=self.run_id, purpose="ckks-key",
                               round=self.round, ids=(self.client_id, cid))
            ad = _key_ad(self.run_id, self.round, self.client_id, cid)
            sealed.append(SealedKey(holder=self.client_id, recipient=cid, sealed=seal(key, self._secret, ad)))
        return sealed, refused

    def client(self) -> CkksClient:
        """The key holder's own client side (it holds the secret context already)."""
        out = CkksClient(self.client_id, self._identity, self._peers, self.params, run_id=self.run_id, round=self.round)
        out._load(self._secret)
        return out


class CkksClient:
    """A client's side: receive the sealed secret context, encrypt and sign uploads, decrypt the sum."""

    def __init__(
        self, client_id: str, identity: ed25519.Ed25519PrivateKey, peers: Mapping[str, ed25519.Ed25519PublicKey],
        params: CkksParams, *, run_id: str, round: int,
    ) -> None:
        self.client_id, self.params, self.run_id, self.round = client_id, params, run_id, round
        self._identity, self._peers = identity, dict(peers)
        self._ephemeral = KeyPair.generate()
        self._context: Any = None
        self._secret: bytes = b""
        self._public: bytes = b""

    def advertise(self) -> SignedKeys:
        """Key set-up, step 1: a fresh X25519 key for the key holder, signed with this client's identity."""
        keys = (self._ephemeral.public_raw,)
        return sign_keys(self._identity, self.run_id, self.client_id, PURPOSE, self.round, keys)

    def receive_key(self, holder_advert: SignedKeys, message: SealedKey) -> None:
        """Key set-up, step 2: verify the holder's signed key, open the sealed secret context."""
        holder = holder_advert.client_id
        if holder not in self._peers or message.holder != holder or message.recipient != self.client_id:
            raise MalformedMessageError(f"client {self.client_id!r}: sealed key not from the advertised holder to it")
        verify_keys(holder_advert, self._peers[holder], self.run_id, PURPOSE, self.round, 1)
        key = pairwise_key(self._ephemeral.private, holder_advert.keys[0], run_id=self.run_id, purpose="ckks-key",
                           round=self.round, ids=(self.client_id, holder))
        self._load(open_sealed(key, message.sealed, _key_ad(self.run_id, self.round, holder, self.client_id),
                               f"sealed key from {holder!r}"))

    def _load(self, secret: bytes) -> None:
        import tenseal as ts

        context = ts.context_from(secret)
        if not context.is_private():
            raise MalformedMessageError(f"client {self.client_id!r}: the sealed context holds no secret key")
        self._context = context
        self._secret = secret
        self._public = _public_bytes(context)

    def _require_key(self) -> None:
        if self._context is None:
            raise ProtocolStageError(f"client {self.client_id!r}: no CKKS key yet (receive_key first)")

    def encrypt(self, vector: np.ndarray, round: int, executor: Executor | None = None) -> CkksUpload:
        """Encrypt ``vector`` (pre-weighted values and the weight last) block-wise and sign the upload."""
        self._require_key()
        largest = float(np.abs(vector).max()) if vector.size else 0.0
        if not largest < self.params.max_abs:  # also catches NaN
            raise ValueError(
                f"client {self.client_id!r}: |value| up to {largest:g}, expected < {self.params.max_abs:g} "
                f"(2^(59 - scale_bits) / max_clients): lower scale_bits or max_clients, or the weights"
            )
        slots = self.params.slots
        chunks = [vector[i : i + slots].tolist() for i in range(0, vector.size, slots)]  # (<= slots,) each
        if executor is not None:
            if isinstance(executor, ProcessPoolExecutor):  # local worker processes of this client
                blocks = list(executor.map(_encrypt_in_worker, [self._secret] * len(chunks), chunks))
            else:
                blocks = list(executor.map(self._encrypt_one, chunks))
        elif self.params.workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(self.params.workers) as pool:
                blocks = list(pool.map(self._encrypt_one, chunks))
        else:
            blocks = [self._encrypt_one(chunk) for chunk in chunks]
        key = key_id(self._secret)
        signature = self._identity.sign(_upload_bytes(self.run_id, round, self.client_id, key, blocks))
        return CkksUpload(client_id=self.client_id, round=round, key=key, blocks=tuple(blocks),
                          signature=signature)

    def _encrypt_one(self, chunk: list[float]) -> bytes:
        import tenseal as ts

        return ts.ckks_vector(self._context, chunk).serialize()

    def decrypt(self, total: CkksSum, length: int) -> np.ndarray:
        """The decrypted sum, ``length`` values (float64)."""
        import tenseal as ts

        self._require_key()
        if len(total.blocks) != self.params.num_blocks(length):
            raise MalformedMessageError(f"sum of {len(total.blocks)} blocks, expected {self.params.num_blocks(length)}")
        values: list[float] = []
        for block in total.blocks:
            values.extend(ts.ckks_vector_from(self._context, block).decrypt())
        if len(values) != length:
            raise MalformedMessageError(f"sum decrypts to {len(values)} values, expected {length}")
        return np.asarray(values, dtype=np.float64)

    @property
    def public_context(self) -> bytes:
        self._require_key()
        return self._public

    @property
    def key_id(self) -> bytes:
        self._require_key()
        return key_id(self._secret)


def _public_bytes(context: Any) -> bytes:
    """The context without any key: enough to load and add ciphertexts, not to encrypt or decrypt."""
    return context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)


def _encrypt_in_worker(secret: bytes, chunk: list[float]) -> bytes:
    """Process-pool worker of a client (its own machine: the secret context goes to its child processes)."""
    import tenseal as ts

    cache = _WORKER_CONTEXT
    if cache.get("bytes") != secret:
        cache["bytes"], cache["context"] = secret, ts.context_from(secret)
    return ts.ckks_vector(cache["context"], chunk).serialize()


_WORKER_CONTEXT: dict[str, Any] = {}


class CkksServer:
    """The server's side: verifies uploads, adds ciphertexts under the keyless context (no secret key).

    ``public_context`` and ``key`` (the `key_id`) are what the key holder announces for the run.
    """

    def __init__(
        self, public_context: bytes, key: bytes, client_ids: Sequence[str],
        identities: Mapping[str, ed25519.Ed25519PublicKey], params: CkksParams, length: int, *, run_id: str,
        round: int, min_clients: int = 1,
    ) -> None:
        import tenseal as ts

        context = ts.context_from(public_context)
        if context.is_private():
            raise ValueError("public_context: expected a context without the secret key, got a private one")
        self.context = context
        self.key_id = key
        self.client_ids = sorted(client_ids)
        self.params, self.length, self.run_id, self.round, self.min_clients = params, length, run_id, round, min_clients
        self._identities = dict(identities)
        self._uploads: dict[str, CkksUpload] = {}
        self._vectors: dict[str, list[Any]] = {}
        self._finished = False
        self.excluded: dict[str, str] = {}

    def receive(self, upload: CkksUpload) -> None:
        """Check one upload; a tampered, repeated or foreign-key upload excludes its sender (named)."""
        cid = upload.client_id
        if cid not in self.client_ids:
            return
        if cid in self._uploads or cid in self.excluded:
            self.excluded.setdefault(cid, "uploaded twice")
            self._uploads.pop(cid, None)
            self._vectors.pop(cid, None)
            return
        reason = self._check(upload)
        vectors: list[Any] = []
        if not reason:
            vectors, reason = self._load(upload)
        if reason:
            self.excluded[cid] = reason
        else:
            self._uploads[cid] = upload
            self._vectors[cid] = vectors

    def _load(self, upload: CkksUpload) -> tuple[list[Any], str]:
        import tenseal as ts

        vectors = []
        for index, block in enumerate(upload.blocks):
            expected = min(self.params.slots, self.length - index * self.params.slots)
            try:
                vector = ts.ckks_vector_from(self.context, block)
            except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError/TypeError
                return [], f"block {index} is not a CKKS vector under the run's context: {exc}"
            if vector.size() != expected:
                return [], f"block {index} holds {vector.size()} values, expected {expected}"
            vectors.append(vector)
        return vectors, ""

    def _check(self, upload: CkksUpload) -> str:
        if upload.round != self.round:
            return f"upload for round {upload.round}, expected {self.round}"
        if upload.key != self.key_id:
            return "encrypted under another CKKS key (key id differs)"
        if len(upload.blocks) != self.params.num_blocks(self.length):
            return f"{len(upload.blocks)} ciphertext blocks, expected {self.params.num_blocks(self.length)}"
        signed = _upload_bytes(self.run_id, upload.round, upload.client_id, upload.key, upload.blocks)
        try:
            self._identities[upload.client_id].verify(upload.signature, signed)
        except InvalidSignature:
            return "signature over the ciphertexts does not verify (tampered upload)"
        return ""

    def finish(self) -> CkksSum:
        """Add the verified uploads block by block (once); abort below ``min_clients``."""
        if self._finished:
            raise ProtocolStageError(f"ckks round {self.round}: the sum was already computed")
        self._finished = True
        ids = sorted(self._uploads)
        if len(ids) < self.min_clients:
            raise RoundAbortedError(
                f"ckks round {self.round}: {len(ids)} valid uploads, fewer than min_clients = {self.min_clients} "
                f"(excluded: {self.excluded or 'none'}); round aborted, nothing aggregated"
            )
        blocks = []
        for index in range(self.params.num_blocks(self.length)):
            total = self._vectors[ids[0]][index]  # loaded by this server from bytes: free to add into
            for cid in ids[1:]:
                total += self._vectors[cid][index]  # ciphertext + ciphertext: no key needed
            blocks.append(total.serialize())
        return CkksSum(blocks=tuple(blocks), clients=ids, excluded=dict(self.excluded))
