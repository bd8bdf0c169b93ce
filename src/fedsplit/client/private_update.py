"""A client's side of private aggregation over the network (arXiv 2503.12226 on FL-GLM, arXiv 2406.14898).

In ``secagg``, ``ckks`` or ``hybrid`` mode the client runner hands its round update to
:meth:`PrivateUpdate.submit` instead of sending it in the clear::

    (distributed DP: clip the update to C, add N(0, z^2 C^2 / n) per element: aggregation.dp.privatize_update)
    CLIENT_UPDATE        num_examples, metrics and only the policy's plaintext tensors (none unless hybrid)
    secagg  AGG_ADVERTISE ~> keys of every peer (Ed25519-verified), this client's weight
            AGG_SHARE_KEYS ~> the shares sealed to it      AGG_MASKED_INPUT ~> the unmask request
            AGG_UNMASK_RESPONSE (or the refusal: the request would reveal a single input)
    ckks    AGG_CKKS_ADVERTISE ~> the run's secret context sealed for it by the key holder (the first
            client to ask makes the key and, by AGG_CKKS_HOLDER, seals it for the others)
            AGG_CKKS_UPLOAD ~> the encrypted sum;  AGG_CKKS_DECRYPTED: the sum, decrypted by this client

``~>`` is a request repeated unchanged while the reply says ``wait_s > 0``. The upload is pre-weighted
by the weight the server names, which must be 1 under DP and otherwise at least 1 and at most this
client's own data report (a server cannot zero the others' weights to isolate one input). Any failure
of a phase loses this round for this client (:class:`PrivateRoundError`): it rejoins at the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import Message
from torch import Tensor

from fedsplit.aggregation import wire
from fedsplit.aggregation.ckks import CkksClient, CkksKeyHolder, CkksSum, CkksUpload, SealedKey
from fedsplit.aggregation.codec import TensorLayout
from fedsplit.aggregation.dp import privatize_update
from fedsplit.aggregation.errors import PrivateAggregationError, UnmaskRefusedError
from fedsplit.aggregation.hybrid import ALL_ENCRYPTED, check_top_fraction
from fedsplit.aggregation.secagg import EncryptedShare, SecAggClient, UnmaskRequest
from fedsplit.channel import Channel
from fedsplit.config import AggregationConfig, RunConfig
from fedsplit.protocol import ProtocolError, decode_named, encode_named, encode_tensor, pb

__all__ = ["PrivateRoundError", "PrivateUpdate", "private_update_for"]

log = logging.getLogger(__name__)
CKKS_KEY_ROUND = 0  # as fedsplit.server.private_round: the key hand-off is signed for round 0


class PrivateRoundError(RuntimeError):
    """This client could not complete a private round's phases (it loses the round, not the run)."""


class PrivateUpdate:
    """One client's private-aggregation state: its identity, its peers' identities, the run's CKKS key."""

    def __init__(
        self,
        client_id: str,
        cfg: AggregationConfig,
        identity: ed25519.Ed25519PrivateKey,
        peers: Mapping[str, ed25519.Ed25519PublicKey],
        *,
        run_id: str,
        max_wait_s: float = 600.0,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if cfg.mode == "plain":
            raise ValueError("aggregation.mode: expected secagg, ckks or hybrid for a PrivateUpdate, got plain")
        if client_id not in peers:
            raise ValueError(f"peers: expected the admitted clients' identities including {client_id!r}")
        self.client_id, self.cfg, self.run_id = client_id, cfg, run_id
        self.identity, self.peers = identity, dict(peers)
        self.max_wait_s, self.sleep = max_wait_s, sleep
        self._ckks: CkksClient | None = None
        self._holder: CkksKeyHolder | None = None

    # -- the round ---------------------------------------------------------------------------------
    def submit(self, channel: Channel, plan: pb.RoundPlan, update: pb.ClientUpdate, data_report: int) -> None:
        """Send ``update`` (this round's full adapters) privately: plaintext part, then the encrypted phases."""
        mode = plan.settings.get("aggregation", "plain")
        if mode != self.cfg.mode:
            raise PrivateRoundError(f"client {self.client_id}: the server aggregates round {plan.round} with "
                                    f"{mode!r}, this client is configured for {self.cfg.mode!r}")
        uniform = self.cfg.dp_noise == "distributed"
        if (plan.settings.get("dp_noise") == "distributed") != uniform:
            raise PrivateRoundError(f"client {self.client_id}: the plan's dp_noise {plan.settings.get('dp_noise')!r} "
                                    f"differs from this client's {self.cfg.dp_noise!r}")
        tensors = self._privatize(plan, decode_named(update.adapters, "ClientUpdate.adapters"))
        groups = wire.partition(self.cfg, tensors, self._encrypted_set(plan, tensors))
        plain = {k: tensors[k] for k in groups.get("plain", [])}
        clear = pb.ClientUpdate(round=plan.round, adapters=encode_named(plain), num_examples=update.num_examples,
                                metrics=dict(update.metrics))
        channel.call(pb.CLIENT_UPDATE, clear, round=plan.round)
        encrypted_mode = "ckks" if "ckks" in groups else "secagg"
        secret = {k: tensors[k] for k in groups[encrypted_mode]}
        try:
            if encrypted_mode == "secagg":
                self._secagg(channel, plan.round, secret, data_report, uniform)
            else:
                self._ckks_round(channel, plan.round, secret, data_report, uniform)
        except (PrivateAggregationError, ProtocolError, ValueError, RuntimeError, TypeError) as exc:  # TenSEAL: any
            raise PrivateRoundError(f"client {self.client_id}: {encrypted_mode} round {plan.round}: {exc}") from exc

    def _encrypted_set(self, plan: pb.RoundPlan, tensors: Mapping[str, Tensor]) -> list[str] | None:
        """``hybrid_top_fraction``: the server's encrypted set for the round, checked (aggregation.hybrid)."""
        if not (self.cfg.mode == "hybrid" and self.cfg.hybrid_top_fraction > 0):
            return None
        raw = plan.settings.get("hybrid_encrypted")
        if raw is None:
            raise PrivateRoundError(f"client {self.client_id}: round {plan.round}'s plan names no encrypted tensors "
                                    f"(hybrid_top_fraction = {self.cfg.hybrid_top_fraction})")
        names = list(tensors) if raw == ALL_ENCRYPTED else raw.split("\n")
        try:
            return check_top_fraction(names, {k: v.numel() for k, v in tensors.items()}, self.cfg.hybrid_top_fraction)
        except ValueError as exc:
            raise PrivateRoundError(f"client {self.client_id}: round {plan.round}: {exc}") from exc

    def _privatize(self, plan: pb.RoundPlan, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Distributed DP-FedAvg noise, when the plan asks for it (settings from aggregation.dp.DPFedAvg)."""
        settings = plan.settings
        if settings.get("dp_noise") != "distributed":
            return tensors
        try:
            clip, multiplier = float(settings["dp_clip"]), float(settings["dp_noise_multiplier"])
            expected = int(settings["dp_expected_clients"])
        except (KeyError, ValueError) as exc:
            raise PrivateRoundError(f"RoundPlan.settings: distributed DP without its numbers: {exc}") from exc
        current = decode_named(plan.adapters, "RoundPlan.adapters")
        return privatize_update(tensors, current, clip=clip, noise_multiplier=multiplier, expected_clients=expected)

    def _weight(self, offered: int, data_report: int, uniform: bool) -> int:
        most = 1 if uniform else max(1, data_report)
        if not 1 <= offered <= most:
            raise PrivateRoundError(f"client {self.client_id}: the server asks for weight {offered}, expected "
                                    f"1..{most} ({'DP: every client weighs 1' if uniform else 'its data report'})")
        return offered

    def _num_clients(self, offered: int, at_least: int) -> int:
        if not max(1, at_least) <= offered <= len(self.peers):
            raise PrivateRoundError(f"client {self.client_id}: the server names {offered} participants, expected "
                                    f"{max(1, at_least)}..{len(self.peers)}")
        return offered

    def _poll(self, channel: Channel, kind: int, message: Message, round: int) -> Any:
        """Send ``message`` until the reply no longer says ``wait_s``."""
        deadline = time.monotonic() + self.max_wait_s
        while True:
            reply = channel.call(kind, message, round=round)
            if not reply.wait_s > 0:
                return reply
            if time.monotonic() > deadline:
                raise PrivateRoundError(f"client {self.client_id}: no answer to {pb.Kind.Name(kind)} within "
                                        f"{self.max_wait_s} s")
            self.sleep(reply.wait_s)

    # -- secagg ------------------------------------------------------------------------------------
    def _secagg(self, channel: Channel, round: int, secret: dict[str, Tensor], report: int, uniform: bool) -> None:
        params = self.cfg.secagg_params(len(self.peers))  # provisional: the threshold follows the round's size
        client = SecAggClient(self.client_id, self.identity, self.peers, params, run_id=self.run_id, round=round)
        advert = wire.keys_to_pb(client.advertise())
        keys = self._poll(channel, pb.AGG_ADVERTISE, pb.AggAdvertiseKeys(round=round, advert=advert), round)
        adverts = [wire.keys_from_pb(a, "AggKeysBroadcast", count=3) for a in keys.adverts]
        num_clients = self._num_clients(keys.num_clients, len(adverts))
        weight = self._weight(int(keys.weight), report, uniform)
        client.params = params = self.cfg.secagg_params(num_clients)  # before share_keys: it fixes t and k
        shares = self.send_shares(channel, round, client.share_keys(adverts))
        layout = TensorLayout.of(secret)
        encoded, clipped = params.quantizer(num_clients).encode(layout.flatten(secret), weight)
        if clipped:
            log.warning("client %s: %d adapter values clipped to +-%g before masking", self.client_id, clipped,
                        params.clip)
        masked = client.mask_input(encoded, shares)
        message = pb.AggMaskedInput(round=round, data=masked.data, masked_with=list(masked.masked_with),
                                    rejected=list(masked.rejected))
        request = self._poll(channel, pb.AGG_MASKED_INPUT, message, round)
        try:
            if len(request.survivors) < 2:  # the "sum" would be one client's input
                raise UnmaskRefusedError(f"client {self.client_id}: unmask request for {len(request.survivors)} "
                                         f"survivor(s); a private sum needs at least 2")
            response = client.unmask(UnmaskRequest(tuple(request.survivors), tuple(request.dropped)))
        except PrivateAggregationError as exc:  # UnmaskRefusedError: say so, then lose the round
            channel.call(pb.AGG_UNMASK_RESPONSE, pb.AggUnmaskResponse(round=round, refused=str(exc)), round=round)
            raise
        channel.call(pb.AGG_UNMASK_RESPONSE, pb.AggUnmaskResponse(
            round=round, self_shares=response.self_shares, key_shares=response.key_shares), round=round)

    def send_shares(self, channel: Channel, round: int, shares: list[EncryptedShare]) -> list[EncryptedShare]:
        """Send this client's sealed shares; returns the ones its neighbours sealed for it."""
        reply = self._poll(channel, pb.AGG_SHARE_KEYS, pb.AggShareKeys(round=round, shares=wire.shares_to_pb(shares)),
                           round)
        return wire.shares_from_pb(reply.shares, wire.WireBounds(participants=len(self.peers)), "AggShares")

    # -- ckks --------------------------------------------------------------------------------------
    def _ckks_round(self, channel: Channel, round: int, secret: dict[str, Tensor], report: int, uniform: bool) -> None:
        offer = self._ckks_key(channel, round)
        weight = self._weight(int(offer.weight), report, uniform)
        self._num_clients(offer.num_clients, 1)
        assert self._ckks is not None
        layout = TensorLayout.of(secret)
        vector = np.append(layout.flatten(secret) * weight, float(weight))  # (numel + 1,): [w x ..., w]
        upload = self.encrypt(vector, round)
        message = pb.AggCkksUpload(round=round, key_id=upload.key, blocks=list(upload.blocks),
                                   signature=upload.signature)
        total = self._poll(channel, pb.AGG_CKKS_UPLOAD, message, round)
        if len(set(total.clients)) < 2:
            raise PrivateRoundError(f"client {self.client_id}: a sum of {len(total.clients)} client(s) is not private; "
                                    f"not decrypted")
        summed = self._ckks.decrypt(CkksSum(tuple(total.blocks), list(total.clients)), vector.size)
        decrypted = pb.AggCkksDecrypted(round=round, sum=encode_tensor(torch.from_numpy(summed)))
        channel.call(pb.AGG_CKKS_DECRYPTED, decrypted, round=round)

    def encrypt(self, vector: np.ndarray, round: int) -> CkksUpload:
        """The signed, block-wise encryption of ``vector`` under the run's key."""
        if self._ckks is None:
            raise PrivateRoundError(f"client {self.client_id}: no CKKS key")
        return self._ckks.encrypt(vector, round)

    def _ckks_key(self, channel: Channel, round: int) -> pb.AggCkksKey:
        """Hold the run's current CKKS key: make it (key holder), or receive it sealed from the holder."""
        deadline = time.monotonic() + self.max_wait_s
        asking: CkksClient | None = None  # a fresh ephemeral key while waiting for the sealed context
        while time.monotonic() < deadline:
            have = self._ckks.key_id if self._ckks is not None else b""
            message = pb.AggCkksAdvertise(round=round, key_id=have)
            if not have or (asking is not None):
                asking = asking or CkksClient(self.client_id, self.identity, self.peers, self.cfg.ckks_params(),
                                              run_id=self.run_id, round=CKKS_KEY_ROUND)
                message.advert.CopyFrom(wire.keys_to_pb(asking.advertise()))
                message.key_id = b""
            reply = channel.call(pb.AGG_CKKS_ADVERTISE, message, round=round)
            if reply.holder == self.client_id:
                self._hold_key(channel, round, reply)
                return reply
            if reply.sealed and asking is not None:
                holder_advert = wire.keys_from_pb(reply.holder_advert, "AggCkksKey.holder_advert", count=1)
                asking.receive_key(holder_advert, SealedKey(reply.holder, self.client_id, bytes(reply.sealed)))
                if asking.key_id != reply.key_id:
                    raise PrivateRoundError(f"client {self.client_id}: the sealed key is not the announced key")
                self._ckks, self._holder = asking, None
                return reply
            if have and reply.holder and reply.key_id != have:  # a new key (or a restarted server): ask for it
                self._ckks, self._holder = None, None
                continue
            if have and reply.key_id == have and not reply.wait_s > 0:
                return reply
            self.sleep(reply.wait_s or 0.05)
        raise PrivateRoundError(f"client {self.client_id}: no CKKS key within {self.max_wait_s} s")

    def _hold_key(self, channel: Channel, round: int, offer: pb.AggCkksKey) -> None:
        """Key holder: make the key if it has none the server knows, then seal it for every peer that asks."""
        if self._holder is None or offer.key_id != self._holder.key_id:
            self._holder = CkksKeyHolder(self.client_id, self.identity, self.peers, self.cfg.ckks_params(),
                                         run_id=self.run_id, round=CKKS_KEY_ROUND)
            self._ckks = self._holder.client()
        holder = self._holder
        message = pb.AggCkksHolder(round=round, advert=wire.keys_to_pb(holder.advertise()),
                                   public_context=holder.public_context, key_id=holder.key_id)
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:
            reply = channel.call(pb.AGG_CKKS_HOLDER, message, round=round)
            adverts = [wire.keys_from_pb(a, "AggCkksPending", count=1) for a in reply.adverts]
            sealed, refused = holder.seal_for(adverts)
            if refused:
                log.warning("client %s: refused to seal the CKKS key for %s", self.client_id, refused)
            del message.sealed[:]
            message.sealed.extend(pb.AggSealedKey(holder=s.holder, recipient=s.recipient, sealed=s.sealed)
                                  for s in sealed)
            if reply.done and not sealed:
                return
            if not sealed:
                self.sleep(reply.wait_s or 0.05)
        raise PrivateRoundError(f"client {self.client_id}: the peers did not all receive the CKKS key in time")


def private_update_for(cfg: RunConfig, keys: Path, identity: ed25519.Ed25519PrivateKey) -> PrivateUpdate | None:
    """The client's private-aggregation side for ``[aggregation] mode`` (None in plain mode).

    It needs every admitted client's identity (``security.clients``, ``keys/<id>.pub``): the peers' keys are
    checked against them, so that the relaying server cannot substitute its own.
    """
    if cfg.aggregation.mode == "plain":
        return None
    if cfg.client.id not in cfg.security.clients:
        raise ValueError(f"security.clients: mode {cfg.aggregation.mode!r} needs the admitted clients' ids (and their "
                         f".pub files in {keys}) on every client, including this one ({cfg.client.id!r})")
    from fedsplit.security.identity import load_public_key

    peers = {cid: load_public_key(keys / f"{cid}.pub") for cid in cfg.security.clients}
    return PrivateUpdate(cfg.client.id, cfg.aggregation, identity, peers, run_id=cfg.security.run_id,
                         max_wait_s=cfg.server.round_timeout_s)
