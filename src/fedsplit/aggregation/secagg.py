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
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from fedsplit.aggregation import shamir
from fedsplit.aggregation.codec import Quantizer, pack_ring, unpack_ring
from fedsplit.aggregation.errors import (
    MalformedMessageError,
    ProtocolStageError,
    RoundAbortedError,
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
    x25519_public_raw,
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
    "SecAggServer",
    "neighbourhoods",
]

PURPOSE = "secagg"
_MAX_RECOVERY_TRIES = 256  # subsets of t shares tried when some shares are wrong


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


def _graph_seed(run_id: str, round: int) -> bytes:
    return hashlib.sha256(encode_fields(b"fedsplit/secagg/graph/v1", text(run_id), u64(round))).digest()


def _commitment(run_id: str, round: int, client_id: str, seed: bytes) -> bytes:
    fields = encode_fields(b"fedsplit/secagg/commit/v1", text(run_id), u64(round), text(client_id), seed)
    return hashlib.sha256(fields).digest()


def _share_ad(run_id: str, round: int, sender: str, recipient: str) -> bytes:
    return encode_fields(b"fedsplit/secagg/share/v1", text(run_id), u64(round), text(sender), text(recipient))


def _share_points(ids: Sequence[str]) -> dict[str, int]:
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
        commit = _commitment(self.run_id, self.round, self.client_id, self._self_seed)
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
        graph = neighbourhoods(ids, self.params.neighbours, _graph_seed(self.run_id, self.round))
        self._neighbours = graph[self.client_id]
        holders = sorted(self._neighbours | {self.client_id})
        self.params.check_group(len(holders))
        self._points = _share_points(ids)
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
        fields = _decode_fields(plaintext, b"fedsplit/secagg/shares/v1", 2, who)
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
        quantizer_mask = _ring_mask(self.params.ring_bits)
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


def _decode_fields(data: bytes, label: bytes, count: int, who: str) -> list[bytes]:
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


class SecAggServer:
    """The server's side: relays keys and shares, collects masked inputs, unmasks the sum of survivors."""

    def __init__(
        self,
        client_ids: Sequence[str],
        identities: Mapping[str, ed25519.Ed25519PublicKey],
        params: SecAggParams,
        vector_len: int,
        *,
        run_id: str,
        round: int,
    ) -> None:
        if len(set(client_ids)) != len(client_ids) or not client_ids:
            raise ValueError(f"client_ids: expected unique, non-empty ids, got {list(client_ids)}")
        missing = sorted(set(client_ids) - set(identities))
        if missing:
            raise ValueError(f"identities: expected a public key for every client, missing {missing}")
        self.client_ids = sorted(client_ids)
        self.params = params
        self.vector_len = vector_len  # numel + 1 (the weight)
        self.run_id = run_id
        self.round = round
        self._identities = dict(identities)
        self.stage = Stage.ADVERTISE
        self.excluded: dict[str, str] = {}
        self._adverts: dict[str, SignedKeys] = {}
        self._neighbours: dict[str, frozenset[str]] = {}
        self._shares: dict[str, list[EncryptedShare]] = {}
        self._inputs: dict[str, MaskedInput] = {}
        self._responses: dict[str, UnmaskResponse] = {}
        self._request: UnmaskRequest | None = None
        self._sharing: set[str] = set()

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise ProtocolStageError(f"server: expected stage {stage.value}, at {self.stage.value}")

    def _exclude(self, client_id: str, reason: str) -> None:
        self.excluded.setdefault(client_id, reason)

    def broadcast_keys(self, adverts: Sequence[SignedKeys]) -> list[SignedKeys]:
        """Close stage 0: keep the verified adverts of planned clients; every client receives this list."""
        self._expect(Stage.ADVERTISE)
        for advert in adverts:
            cid = advert.client_id
            if cid not in self.client_ids:
                continue  # not in this round's plan: ignored, not a participant
            if cid in self._adverts:
                self._exclude(cid, "advertised keys twice")
                continue
            try:
                verify_keys(advert, self._identities[cid], self.run_id, PURPOSE, self.round, 3)
            except MalformedMessageError as exc:
                self._exclude(cid, str(exc))
                continue
            self._adverts[cid] = advert
        for cid in self.excluded:
            self._adverts.pop(cid, None)
        ids = sorted(self._adverts)
        if len(ids) < self.params.threshold:
            raise RoundAbortedError(
                f"secagg round {self.round}: {len(ids)} clients advertised keys, fewer than the threshold "
                f"t = {self.params.threshold}; round aborted"
            )
        self._neighbours = neighbourhoods(ids, self.params.neighbours, _graph_seed(self.run_id, self.round))
        self.stage = Stage.SHARE_KEYS
        return [self._adverts[cid] for cid in ids]

    def receive_shares(self, sender: str, messages: Sequence[EncryptedShare]) -> None:
        """Stage 1 input from ``sender``: its sealed shares, one per neighbour (the server cannot open them)."""
        self._expect(Stage.SHARE_KEYS)
        if sender not in self._adverts or sender in self.excluded:
            return
        if sender in self._shares:
            self._exclude(sender, "sent its shares twice")
            return
        recipients = [m.recipient for m in messages]
        if any(m.sender != sender for m in messages) or sorted(recipients) != sorted(self._neighbours[sender]):
            self._exclude(sender, f"shares addressed to {sorted(recipients)}, expected its neighbours")
            return
        self._shares[sender] = list(messages)

    def deliver_shares(self) -> dict[str, list[EncryptedShare]]:
        """Close stage 1: the sealed shares for each client that shared (senders that shared too)."""
        self._expect(Stage.SHARE_KEYS)
        sharing = set(self._shares) - set(self.excluded)
        out: dict[str, list[EncryptedShare]] = {cid: [] for cid in sorted(sharing)}
        for sender in sorted(sharing):
            for message in self._shares[sender]:
                if message.recipient in sharing:
                    out[message.recipient].append(message)
        self._sharing = sharing
        self.stage = Stage.MASKED_INPUT
        return out

    def receive_masked(self, message: MaskedInput) -> None:
        """Stage 2 input; a wrong-size or repeated upload excludes its sender (named, before unmasking)."""
        self._expect(Stage.MASKED_INPUT)
        cid = message.client_id
        if cid not in self._sharing:
            return
        if cid in self._inputs:
            self._exclude(cid, "uploaded a masked input twice")
            return
        expected = self.vector_len * ((self.params.ring_bits + 7) // 8)
        if len(message.data) != expected:
            self._exclude(cid, f"masked input of {len(message.data)} bytes, expected {expected}")
        unknown = set(message.masked_with) - self._neighbours.get(cid, frozenset())
        if unknown:
            self._exclude(cid, f"claims masks with non-neighbours {sorted(unknown)}")
        self._inputs[cid] = message

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 2: decide survivors and dropped (exclusions applied); abort below ``t`` survivors."""
        self._expect(Stage.MASKED_INPUT)
        for cid, message in self._inputs.items():
            for peer in message.rejected:
                if peer in self._neighbours.get(cid, frozenset()):
                    self._exclude(peer, f"client {cid!r} rejected its key shares as malformed")
        candidates = set(self._inputs) - set(self.excluded)
        for cid in sorted(candidates):  # pairwise masks between two summed clients must cancel
            for peer in sorted(self._neighbours[cid] & candidates):
                mine, theirs = peer in self._inputs[cid].masked_with, cid in self._inputs[peer].masked_with
                if mine != theirs:
                    self._exclude(cid, f"mask graph disagrees with client {peer!r}")
                    self._exclude(peer, f"mask graph disagrees with client {cid!r}")
        survivors = sorted(set(self._inputs) - set(self.excluded))
        dropped = sorted(self._sharing - set(survivors))
        if len(survivors) < self.params.threshold:
            raise RoundAbortedError(
                f"secagg round {self.round}: {len(survivors)} survivors ({', '.join(survivors) or 'none'}), "
                f"fewer than the threshold t = {self.params.threshold}; dropped or excluded: "
                f"{', '.join(dropped) or 'none'} ({self.excluded or 'no exclusions'}); "
                f"round aborted, nothing aggregated"
            )
        self._request = UnmaskRequest(survivors=tuple(survivors), dropped=tuple(dropped))
        self.stage = Stage.UNMASK
        return self._request

    def receive_unmask(self, response: UnmaskResponse) -> None:
        self._expect(Stage.UNMASK)
        assert self._request is not None
        if response.client_id in self._request.survivors and response.client_id not in self._responses:
            self._responses[response.client_id] = response

    def finish(self) -> SecAggSum:
        """Close stage 3: recover the survivors' self-mask seeds and the dropped clients' mask keys, unmask."""
        self._expect(Stage.UNMASK)
        assert self._request is not None
        survivors, dropped = list(self._request.survivors), list(self._request.dropped)
        seeds = {cid: self._recover(cid, "self") for cid in survivors}
        cancel = {d: [u for u in survivors if d in self._inputs[u].masked_with] for d in dropped}
        keys = {d: self._recover(d, "key") for d in dropped if cancel[d]}
        total = np.zeros(self.vector_len, dtype=np.uint64)
        for cid in survivors:
            total += unpack_ring(self._inputs[cid].data, self.params.ring_bits, self.vector_len)
            total -= expand_mask(seeds[cid], self.vector_len, "self")
        for d, key in keys.items():
            private = _x25519_private(key)
            for u in cancel[d]:
                seed = pairwise_key(
                    private, self._adverts[u].keys[1], run_id=self.run_id, purpose="secagg-mask",
                    round=self.round, ids=(d, u),
                )
                pad = expand_mask(seed, self.vector_len, "pair")
                total = total - pad if u < d else total + pad  # undo u's +-PRG(s_ud)
        modulus = _ring_mask(self.params.ring_bits)
        self.stage = Stage.DONE
        return SecAggSum(ring_sum=total & modulus, clients=survivors, excluded=dict(self.excluded), dropped=dropped)

    def _recover(self, owner: str, kind: str) -> bytes:
        """Reconstruct ``owner``'s self-mask seed or mask key from the responders' shares, verified."""
        shares, bad = [], []
        point_of = _share_points(sorted(self._adverts))
        group = self._neighbours[owner] | {owner}
        for responder, response in sorted(self._responses.items()):
            raw = (response.self_shares if kind == "self" else response.key_shares).get(owner)
            if raw is None or responder not in group:
                continue
            try:
                share = shamir.Share.from_bytes(raw)
            except ValueError:
                bad.append(responder)
                continue
            if share.x != point_of[responder]:
                bad.append(responder)
                continue
            shares.append(share)
        for responder in bad:
            self._exclude(responder, f"sent a malformed unmask share for {owner!r}")
        t = self.params.threshold
        what = "self-mask seed" if kind == "self" else "mask key"
        if len(shares) < t:
            raise RoundAbortedError(
                f"secagg round {self.round}: only {len(shares)} valid shares of the {what} of {owner!r}, "
                f"threshold t = {t}; round aborted, nothing aggregated"
            )
        advert = self._adverts[owner]
        for tries, subset in enumerate(itertools.combinations(shares, t)):
            if tries >= _MAX_RECOVERY_TRIES:
                break
            try:
                secret = shamir.combine(subset, t)
            except ValueError:
                continue
            if kind == "self" and _commitment(self.run_id, self.round, owner, secret) == advert.keys[2]:
                return secret
            if kind == "key" and x25519_public_raw(secret) == advert.keys[1]:
                return secret
        raise RoundAbortedError(
            f"secagg round {self.round}: no subset of the {len(shares)} shares of the {what} of {owner!r} "
            f"matches its signed commitment; round aborted, nothing aggregated"
        )


def _ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)


def _x25519_private(raw: bytes) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(raw)
