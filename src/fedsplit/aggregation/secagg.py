"""Secure aggregation with dropout recovery, SecAgg+ style (Bonawitz et al. 2017; Bell et al. 2020).

The server learns the (weighted) sum of the survivors' updates and nothing about any single one.
Every message is relayed by the server; each party is a small state machine over plain dataclasses::

    client u                                   server                                 client v
    ADVERTISE   --SignedKeys(enc_pk, mask_pk, commit(b_u)), Ed25519-signed-->  verify, broadcast --> verify
    SHARE_KEYS  --EncryptedShare(u->v: Shamir shares of b_u and mask_sk_u, AES-GCM under
                  HKDF(X25519(enc_u, enc_v)))-->       route to v (cannot read them)         -->
    MASKED_INPUT --MaskedInput(y_u = w_u q(x_u) || w_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^k)-->
    UNMASK      <--UnmaskRequest(survivors S, dropped D)--   refused if S and D overlap or |S| < t
                --UnmaskResponse(shares of b_v for v in S, of mask_sk_d for d in D)-->
                                               finish: sum_S y - sum_S PRG(b) -+ PRG(s_ud) for d in D

* Neighbourhoods: for ``n`` clients each client shares with and masks against ``k`` neighbours on a
  ring (a Harary graph) whose order is a hash of the run, round and ids (Bell et al.'s SecAgg+);
  ``k = 0`` or ``k >= n - 1`` is the complete graph of SecAgg. Shares go to the neighbours and to
  the client itself (x = 1 + its index among the advertised ids); threshold ``t`` must satisfy
  ``(k + 1) / 2 < t <= k + 1``: a server would need ``2t`` answers from ``k + 1`` holders to get both
  the self-mask seed and the mask key of one client, and each honest client answers for a peer with
  one kind of share only (an unmask request naming a client both survivor and dropped is refused).
* Masks: ChaCha20 keystreams of full 256-bit seeds (`fedsplit.aggregation.keys`), in ``Z_{2^k}``.
* Faults are data: a client whose upload has the wrong size, that uploads twice, whose shares its
  peers reject, or whose masks disagree with a peer is named in ``excluded`` and treated as dropped
  (its pairwise masks are recovered, its self-mask never is), before any unmasking; a malformed
  unmask share is ignored and its sender named. Every reconstructed secret is checked (the mask key
  against the signed public key, the self-mask seed against the signed commitment).
* Too few survivors, or a secret that cannot be recovered, raises `RoundAbortedError`.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.aggregation import shamir
from fedsplit.aggregation.codec import Quantizer, pack_ring
from fedsplit.aggregation.errors import (
    MalformedMessageError,
    ProtocolStageError,
    UnmaskRefusedError,
)
from fedsplit.aggregation.keys import (
    KeyPair,
    SignedKeys,
    expand_mask,
    open_sealed,
    pairwise_key,
    seal,
    sign_keys,
    verify_keys,
)
from fedsplit.security.wire import encode_fields, text, u64

__all__ = [
    "SecAggParams",
    "Stage",
    "EncryptedShare",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskResponse",
    "SecAggSum",
    "SecAggClient",
    "neighbourhoods",
]

PURPOSE = "secagg"


@dataclass(frozen=True)
class SecAggParams:
    """Protocol parameters every party agrees on (from the run configuration)."""

    threshold: int  # t: shares needed to recover a secret
    neighbours: int = 0  # k: even; 0 = complete graph (every client a neighbour of every other)
    ring_bits: int = 48  # masked vectors live in Z_{2^ring_bits}; ceil(bits / 8) bytes per element
    clip: float = 4.0  # inputs (adapter values) are clipped to [-clip, clip] before quantization
    max_weight: int = 4096  # largest integer weight (num_examples) a client may upload

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise ValueError(f"threshold: expected an int >= 1, got {self.threshold!r}")
        if self.neighbours < 0 or self.neighbours % 2:
            raise ValueError(f"neighbours: expected an even int >= 0 (0 = all), got {self.neighbours!r}")
        Quantizer.for_clients(1, ring_bits=self.ring_bits, clip=self.clip, max_weight=self.max_weight)

    def quantizer(self, num_clients: int) -> Quantizer:
        return Quantizer.for_clients(num_clients, ring_bits=self.ring_bits, clip=self.clip, max_weight=self.max_weight)

    def check_group(self, group_size: int) -> None:
        """Raise unless ``t`` suits a sharing group (neighbours + self) of ``group_size`` holders."""
        if not (group_size / 2 < self.threshold <= group_size):
            raise ValueError(
                f"threshold: expected {group_size // 2 + 1}..{group_size} for sharing groups of {group_size} "
                f"(neighbours + self), got {self.threshold}"
            )


class Stage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


@dataclass(frozen=True)
class EncryptedShare:
    """Shamir shares from ``sender`` for ``recipient``, sealed under their pairwise key (server relays)."""

    sender: str
    recipient: str
    sealed: bytes

    @property
    def nbytes(self) -> int:
        return len(self.sender) + len(self.recipient) + len(self.sealed) + 12


@dataclass(frozen=True)
class MaskedInput:
    """A client's masked, pre-weighted, quantized update and the peers it masked against."""

    client_id: str
    data: bytes  # pack_ring(y_u): (numel + 1) elements of ceil(ring_bits / 8) bytes
    masked_with: tuple[str, ...]  # neighbours whose shares it accepted (pairwise masks applied)
    rejected: tuple[str, ...]  # neighbours whose shares were malformed (no mask; the server excludes them)

    @property
    def nbytes(self) -> int:
        return len(self.client_id) + len(self.data) + sum(len(p) + 4 for p in self.masked_with + self.rejected) + 12


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]  # clients whose masked input is summed: reveal their self-mask seeds
    dropped: tuple[str, ...]  # clients that shared keys but are not summed: reveal their mask keys


@dataclass(frozen=True)
class UnmaskResponse:
    client_id: str
    self_shares: dict[str, bytes]  # survivor id -> share of its self-mask seed
    key_shares: dict[str, bytes]  # dropped id -> share of its mask private key

    @property
    def nbytes(self) -> int:
        shares = [*self.self_shares.items(), *self.key_shares.items()]
        return len(self.client_id) + sum(len(k) + len(v) + 8 for k, v in shares)


@dataclass(frozen=True)
class SecAggSum:
    """What the server ends a round with: the ring sum of the survivors' encoded updates."""

    ring_sum: np.ndarray  # (numel + 1,) uint64: [sum w q(x) ..., sum w] mod 2^ring_bits
    clients: list[str]  # survivors, whose inputs are in the sum
    excluded: dict[str, str] = field(default_factory=dict)  # client id -> why it was excluded
    dropped: list[str] = field(default_factory=list)  # clients that shared keys but are not in the sum


def neighbourhoods(ids: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each id's neighbours: ``k / 2`` on either side on a ring ordered by ``SHA-256(seed || id)``."""
    order = sorted(ids, key=lambda cid: hashlib.sha256(seed + cid.encode()).digest())
    n = len(order)
    if k == 0 or k >= n - 1:
        return {cid: frozenset(order) - {cid} for cid in order}
    half = k // 2
    out = {}
    for position, cid in enumerate(order):
        out[cid] = frozenset(order[(position + d) % n] for d in range(-half, half + 1) if d != 0)
    return out


def graph_seed(run_id: str, round: int) -> bytes:
    return hashlib.sha256(encode_fields(b"fedsplit/secagg/graph/v1", text(run_id), u64(round))).digest()


def commitment(run_id: str, round: int, client_id: str, seed: bytes) -> bytes:
    fields = encode_fields(b"fedsplit/secagg/commit/v1", text(run_id), u64(round), text(client_id), seed)
    return hashlib.sha256(fields).digest()


def _share_ad(run_id: str, round: int, sender: str, recipient: str) -> bytes:
    return encode_fields(b"fedsplit/secagg/share/v1", text(run_id), u64(round), text(sender), text(recipient))


def share_points(ids: Sequence[str]) -> dict[str, int]:
    return {cid: index + 1 for index, cid in enumerate(sorted(ids))}


class SecAggClient:
    """One client's side of a secure-aggregation round (stages in order; each method is one message)."""

    def __init__(
        self,
        client_id: str,
        identity: ed25519.Ed25519PrivateKey,
        peers: Mapping[str, ed25519.Ed25519PublicKey],
        params: SecAggParams,
        *,
        run_id: str,
        round: int,
    ) -> None:
        self.client_id = client_id
        self.params = params
        self.run_id = run_id
        self.round = round
        self._identity = identity
        self._peers = dict(peers)  # every admitted client's Ed25519 identity (including this one)
        self.stage = Stage.ADVERTISE
        self._enc = KeyPair.generate()
        self._mask = KeyPair.generate()
        self._self_seed = os.urandom(32)
        self._adverts: dict[str, SignedKeys] = {}
        self._neighbours: frozenset[str] = frozenset()
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # sender -> (its b share, its key share)
        self._points: dict[str, int] = {}

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise ProtocolStageError(f"client {self.client_id!r}: expected stage {stage.value}, at {self.stage.value}")

    def advertise(self) -> SignedKeys:
        """Stage 0: fresh X25519 keys and a commitment to the self-mask seed, signed with the identity."""
        self._expect(Stage.ADVERTISE)
        commit = commitment(self.run_id, self.round, self.client_id, self._self_seed)
        keys = (self._enc.public_raw, self._mask.public_raw, commit)
        self.stage = Stage.SHARE_KEYS
        return sign_keys(self._identity, self.run_id, self.client_id, PURPOSE, self.round, keys)

    def share_keys(self, adverts: Sequence[SignedKeys]) -> list[EncryptedShare]:
        """Stage 1: verify the peers' adverts, Shamir-share b_u and mask_sk_u, seal a share for each neighbour.

        Raises `MalformedMessageError` if any advert does not verify: the relaying server tampered,
        and the client must not go on with this round.
        """
        self._expect(Stage.SHARE_KEYS)
        for advert in adverts:
            if advert.client_id not in self._peers:
                raise MalformedMessageError(f"advert from unknown client {advert.client_id!r}")
            if advert.client_id in self._adverts:
                raise MalformedMessageError(f"two adverts from client {advert.client_id!r}")
            verify_keys(advert, self._peers[advert.client_id], self.run_id, PURPOSE, self.round, 3)
            self._adverts[advert.client_id] = advert
        if self._adverts.get(self.client_id) is None or self._adverts[self.client_id].keys[0] != self._enc.public_raw:
            raise MalformedMessageError(f"client {self.client_id!r}: its own advert is missing or altered")
        ids = sorted(self._adverts)
        graph = neighbourhoods(ids, self.params.neighbours, graph_seed(self.run_id, self.round))
        self._neighbours = graph[self.client_id]
        holders = sorted(self._neighbours | {self.client_id})
        self.params.check_group(len(holders))
        self._points = share_points(ids)
        xs = [self._points[cid] for cid in holders]
        mask_secret = self._mask.private.private_bytes_raw()
        seed_shares = shamir.split(self._self_seed, xs, self.params.threshold)
        key_shares = shamir.split(mask_secret, xs, self.params.threshold)
        out = []
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            if holder == self.client_id:
                self._held[holder] = (seed_share, key_share)
                continue
            plaintext = encode_fields(b"fedsplit/secagg/shares/v1", seed_share.to_bytes(), key_share.to_bytes())
            key = self._share_key(holder)
            sealed = seal(key, plaintext, _share_ad(self.run_id, self.round, self.client_id, holder))
            out.append(EncryptedShare(sender=self.client_id, recipient=holder, sealed=sealed))
        self.stage = Stage.MASKED_INPUT
        return out

    def _share_key(self, peer: str) -> bytes:
        return pairwise_key(
            self._enc.private, self._adverts[peer].keys[0], run_id=self.run_id, purpose="secagg-shares",
            round=self.round, ids=(self.client_id, peer),
        )

    def _open_share(self, message: EncryptedShare) -> tuple[shamir.Share, shamir.Share]:
        who = f"share from {message.sender!r} to {message.recipient!r}"
        if message.recipient != self.client_id or message.sender not in self._neighbours:
            raise MalformedMessageError(f"{who}: not addressed to this client by a neighbour")
        if message.sender in self._held:
            raise MalformedMessageError(f"{who}: a second share from the same sender")
        ad = _share_ad(self.run_id, self.round, message.sender, self.client_id)
        plaintext = open_sealed(self._share_key(message.sender), message.sealed, ad, who)
        fields = decode_fields(plaintext, b"fedsplit/secagg/shares/v1", 2, who)
        try:
            seed_share, key_share = (shamir.Share.from_bytes(f) for f in fields)
        except ValueError as exc:
            raise MalformedMessageError(f"{who}: {exc}") from exc
        mine = self._points[self.client_id]
        if seed_share.x != mine or key_share.x != mine:
            raise MalformedMessageError(f"{who}: shares at x = {seed_share.x}/{key_share.x}, expected {mine}")
        return seed_share, key_share

    def mask_input(self, encoded: np.ndarray, received: Sequence[EncryptedShare]) -> MaskedInput:
        """Stage 2: check the neighbours' shares, then upload ``encoded`` (ring elements) double-masked."""
        self._expect(Stage.MASKED_INPUT)
        rejected = set()
        for message in received:
            try:
                self._held[message.sender] = self._open_share(message)
            except MalformedMessageError:
                if message.sender in self._neighbours and message.sender not in self._held:
                    rejected.add(message.sender)
        accepted = sorted(set(self._held) - {self.client_id})
        quantizer_mask = ring_mask(self.params.ring_bits)
        masked = np.asarray(encoded, dtype=np.uint64) + expand_mask(self._self_seed, encoded.size, "self")
        for peer in accepted:
            pad = expand_mask(self._pair_seed(peer), encoded.size, "pair")
            masked = masked + pad if self.client_id < peer else masked - pad  # uint64 wraps mod 2^64
        self.stage = Stage.UNMASK
        return MaskedInput(
            client_id=self.client_id,
            data=pack_ring(masked & quantizer_mask, self.params.ring_bits),
            masked_with=tuple(accepted),
            rejected=tuple(sorted(rejected)),
        )

    def _pair_seed(self, peer: str) -> bytes:
        return pairwise_key(
            self._mask.private, self._adverts[peer].keys[1], run_id=self.run_id, purpose="secagg-mask",
            round=self.round, ids=(self.client_id, peer),
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: reveal self-mask shares of survivors and mask-key shares of dropped neighbours.

        Refuses (`UnmaskRefusedError`) a request that names a client both survivor and dropped,
        names clients that never advertised, leaves this client out of the survivors, or has fewer
        than ``t`` survivors among this client's sharing group.
        """
        self._expect(Stage.UNMASK)
        survivors, dropped = set(request.survivors), set(request.dropped)
        who = f"client {self.client_id!r}"
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise UnmaskRefusedError(f"{who}: the unmask request lists a client twice")
        both = sorted(survivors & dropped)
        if both:
            raise UnmaskRefusedError(
                f"{who}: the unmask request names {both} both as survivor and as dropped; revealing both "
                f"shares would unmask their individual inputs"
            )
        unknown = sorted((survivors | dropped) - set(self._adverts))
        if unknown:
            raise UnmaskRefusedError(f"{who}: the unmask request names clients that never advertised keys: {unknown}")
        if self.client_id not in survivors:
            raise UnmaskRefusedError(f"{who}: not named as a survivor, so it does not take part in unmasking")
        group = self._neighbours | {self.client_id}
        if len(survivors & group) < self.params.threshold:
            raise UnmaskRefusedError(
                f"{who}: {len(survivors & group)} survivors in its sharing group, fewer than the threshold "
                f"t = {self.params.threshold}"
            )
        self_shares = {cid: self._held[cid][0].to_bytes() for cid in sorted(survivors & group) if cid in self._held}
        key_shares = {cid: self._held[cid][1].to_bytes() for cid in sorted(dropped & group) if cid in self._held}
        self.stage = Stage.DONE
        return UnmaskResponse(client_id=self.client_id, self_shares=self_shares, key_shares=key_shares)


def decode_fields(data: bytes, label: bytes, count: int, who: str) -> list[bytes]:
    fields, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise MalformedMessageError(f"{who}: truncated field header")
        length = int.from_bytes(data[offset : offset + 4], "big")
        fields.append(data[offset + 4 : offset + 4 + length])
        if offset + 4 + length > len(data):
            raise MalformedMessageError(f"{who}: truncated field")
        offset += 4 + length
    if len(fields) != count + 1 or fields[0] != label:
        raise MalformedMessageError(f"{who}: expected {label.decode()} with {count} fields")
    return fields[1:]


def ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
