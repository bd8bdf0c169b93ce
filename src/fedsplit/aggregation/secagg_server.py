"""The server's side of secure aggregation (SecAgg+, Bell et al. 2020; protocol in :mod:`fedsplit.aggregation.secagg`).

The server relays what the clients exchange and sums their masked inputs; it never sees a key,
a share or an unmasked input. It refuses to ask for an unmask that names a client both as a
survivor and as dropped, and aborts a round with fewer than ``threshold`` survivors.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from fedsplit.aggregation import shamir
from fedsplit.aggregation.codec import unpack_ring
from fedsplit.aggregation.errors import (
    MalformedMessageError,
    ProtocolStageError,
    RoundAbortedError,
)
from fedsplit.aggregation.keys import (
    SignedKeys,
    expand_mask,
    pairwise_key,
    verify_keys,
    x25519_public_raw,
)
from fedsplit.aggregation.secagg import (
    PURPOSE,
    EncryptedShare,
    MaskedInput,
    SecAggParams,
    SecAggSum,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    commitment,
    graph_seed,
    neighbourhoods,
    ring_mask,
    share_points,
)

__all__ = ["SecAggServer"]

_MAX_RECOVERY_TRIES = 256  # subsets of t shares tried when some shares are wrong


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
        self._neighbours = neighbourhoods(ids, self.params.neighbours, graph_seed(self.run_id, self.round))
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
        modulus = ring_mask(self.params.ring_bits)
        self.stage = Stage.DONE
        return SecAggSum(ring_sum=total & modulus, clients=survivors, excluded=dict(self.excluded), dropped=dropped)

    def _recover(self, owner: str, kind: str) -> bytes:
        """Reconstruct ``owner``'s self-mask seed or mask key from the responders' shares, verified."""
        shares, bad = [], []
        point_of = share_points(sorted(self._adverts))
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
            if kind == "self" and commitment(self.run_id, self.round, owner, secret) == advert.keys[2]:
                return secret
            if kind == "key" and x25519_public_raw(secret) == advert.keys[1]:
                return secret
        raise RoundAbortedError(
            f"secagg round {self.round}: no subset of the {len(shares)} shares of the {what} of {owner!r} "
            f"matches its signed commitment; round aborted, nothing aggregated"
        )


def _x25519_private(raw: bytes) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(raw)
