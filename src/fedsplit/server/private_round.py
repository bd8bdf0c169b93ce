"""The server's side of private aggregation over the network (arXiv 2503.12226 on FL-GLM, arXiv 2406.14898).

:class:`PrivateAggregator` wraps the run's (linear) ``Strategy``: the round coordinator calls its
``aggregate`` at AGGREGATING as it would the strategy's, and it first runs the aggregation phases of
the round with the clients whose CLIENT_UPDATE arrived (their ClientUpdate carries the plaintext
tensors only: none in ``secagg`` / ``ckks``, the policy's plaintext part in ``hybrid``)::

    secagg  AGG_ADVERTISE -> broadcast -> AGG_SHARE_KEYS -> deliver -> AGG_MASKED_INPUT -> unmask request
            -> AGG_UNMASK_RESPONSE -> finish: the weighted sum of the survivors, decoded
    ckks    AGG_CKKS_ADVERTISE / AGG_CKKS_HOLDER (key hand-off, sealed client to client, once per key)
            -> AGG_CKKS_UPLOAD -> add the ciphertexts -> AGG_CKKS_SUM -> AGG_CKKS_DECRYPTED (every summed
            client decrypts; the decryptions must agree)

Clients drive every phase: a request whose phase has not closed yet is answered with ``wait_s`` and
repeated unchanged (an identical repeat is a poll; a different one is a second upload: excluded). A
phase closes when every expected client answered, left (its last session ended, or it sent JOIN_ROUND
again), or after ``phase_timeout_s``. Then the inner strategy aggregates one ``ClientUpdate`` per summed
client holding the decoded mean of the encrypted tensors and that client's plaintext tensors, weighted by
the weight each client was told (its data report; 1 under distributed DP). A linear strategy thus gives
exactly its plaintext result on the encrypted part. Faults are data: excluded and dropped clients become
``Failure`` s (stage ``aggregating``); a round that cannot be completed safely (``RoundAbortedError``)
returns ``TooFewResults`` naming the cause, so the coordinator keeps the global parts and retries it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import Message
from torch import Tensor

from fedsplit.aggregation import wire
from fedsplit.aggregation.ckks import PURPOSE as CKKS_PURPOSE
from fedsplit.aggregation.ckks import CkksServer, CkksSum, SealedKey
from fedsplit.aggregation.codec import TensorLayout
from fedsplit.aggregation.dp import DPFedAvg, uniform_weight
from fedsplit.aggregation.errors import MalformedMessageError, RoundAbortedError
from fedsplit.aggregation.hybrid import ALL_ENCRYPTED, top_fraction_set
from fedsplit.aggregation.keys import SignedKeys, verify_keys
from fedsplit.aggregation.secagg_server import SecAggServer
from fedsplit.config import AggregationConfig, RunConfig
from fedsplit.protocol import ProtocolError, decode_tensor, pb
from fedsplit.strategy.base import AggregateResult, ClientUpdate, Failure, RoundPlan, Strategy, TooFewResults
from fedsplit.strategy.build import check_aggregation_mode
from fedsplit.strategy.fedavg import FedAvg

__all__ = ["AGG_REQUESTS", "CKKS_KEY_ROUND", "PrivateAggregator", "build_private_strategy", "private_frame_bound"]

log = logging.getLogger(__name__)

AGG_REQUESTS = (pb.AGG_ADVERTISE, pb.AGG_SHARE_KEYS, pb.AGG_MASKED_INPUT, pb.AGG_UNMASK_RESPONSE,
                pb.AGG_CKKS_ADVERTISE, pb.AGG_CKKS_HOLDER, pb.AGG_CKKS_UPLOAD, pb.AGG_CKKS_DECRYPTED)
_CKKS_REQUESTS = frozenset({pb.AGG_CKKS_ADVERTISE, pb.AGG_CKKS_HOLDER, pb.AGG_CKKS_UPLOAD, pb.AGG_CKKS_DECRYPTED})
CKKS_KEY_ROUND = 0  # the CKKS key hand-off is signed for "round 0": one key serves every round of the run
_STAGE = "aggregating"
_DECRYPT_RTOL = 1e-6  # two clients' decryptions of the same sum differ by CKKS noise only

Serve = Callable[[str, int, int, int, Any], Message]


@dataclass
class _Round:
    """One round's aggregation phases: what arrived, what went out. Guarded by the aggregator's lock."""

    number: int
    mode: str  # "secagg" or "ckks": the encrypted part's mode
    participants: list[str]
    weights: dict[str, int]
    layout: TensorLayout  # the encrypted tensors
    phase: str = "advertise"  # secagg: advertise, share, masked, unmask, done; ckks: upload, decrypt, done
    left: set[str] = field(default_factory=set)  # sent JOIN_ROUND again: gone from this round
    excluded: dict[str, str] = field(default_factory=dict)  # named at the wire (malformed, repeated)
    inbox: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> client -> message
    raw: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (phase, client) -> first request's bytes
    broadcast: list[SignedKeys] | None = None
    delivered: dict[str, list[Any]] = field(default_factory=dict)
    request: Any = None  # secagg UnmaskRequest
    total: CkksSum | None = None
    keyed: set[str] = field(default_factory=set)  # ckks: hold the run's current key

    def box(self, phase: str) -> dict[str, Any]:
        return self.inbox.setdefault(phase, {})


@dataclass
class _CkksKey:
    """The run's CKKS key as the server knows it: who holds it, its keyless context and id (never the key)."""

    holder: str = ""
    holder_advert: SignedKeys | None = None
    public_context: bytes = b""
    key_id: bytes = b""
    pending: dict[str, SignedKeys] = field(default_factory=dict)  # adverts waiting for a sealed key
    mailbox: dict[str, tuple[bytes, SealedKey]] = field(default_factory=dict)  # recipient -> (its advert key, key)


class PrivateAggregator:
    """A ``Strategy`` wrapper running secagg / ckks / hybrid aggregation phases before ``inner.aggregate``."""

    def __init__(
        self,
        inner: Strategy,
        cfg: AggregationConfig,
        identities: Mapping[str, ed25519.Ed25519PublicKey],
        *,
        run_id: str,
        phase_timeout_s: float = 60.0,
        poll_s: float = 0.2,
    ) -> None:
        if cfg.mode == "plain":
            raise ValueError("aggregation.mode: expected secagg, ckks or hybrid for a PrivateAggregator, got plain")
        check_aggregation_mode(inner, cfg.mode)
        if not (phase_timeout_s > 0 and poll_s > 0):
            raise ValueError(f"expected phase_timeout_s > 0 and poll_s > 0, got {phase_timeout_s}, {poll_s}")
        self.inner, self.cfg, self.run_id = inner, cfg, run_id
        self.identities = dict(identities)
        self.phase_timeout_s, self.poll_s = phase_timeout_s, poll_s
        self.uniform = cfg.dp_noise == "distributed"  # DP-FedAvg: every client weighs 1
        self.linear = True
        self._alive: Callable[[str], bool] = lambda cid: True
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._submitted: dict[str, int] = {}  # client -> round whose aggregation its accepted update waits for
        self._ckks = _CkksKey()
        self.exclusions: dict[int, dict[str, str]] = {}  # round -> participant left out of the sum -> why
        self.top = cfg.mode == "hybrid" and cfg.hybrid_top_fraction > 0  # encrypt a ranked top fraction
        self._last: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None  # last aggregation: before, after
        self._encrypted: list[str] | None = None  # top: this round's encrypted tensors (None: all, none measured)
        self.encrypted_sets: dict[int, tuple[str, ...] | None] = {}  # top: round -> its set (None: all)
        if "ckks" in (cfg.mode, cfg.hybrid_encrypted_mode if cfg.mode == "hybrid" else ""):
            cfg.ckks_params()  # fail now, not at the first round

    # -- Strategy ------------------------------------------------------------------------------
    @property
    def min_clients(self) -> int:
        return self.inner.min_clients

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        plan = self.inner.configure_round(round, available)
        settings = dict(plan.settings, aggregation=self.cfg.mode)
        if self.top:  # the server decides the set from public global parts; every client checks it
            self._encrypted = None if self._last is None else top_fraction_set(*self._last,
                                                                                self.cfg.hybrid_top_fraction)
            self.encrypted_sets[round] = None if self._encrypted is None else tuple(self._encrypted)
            settings["hybrid_encrypted"] = ALL_ENCRYPTED if self._encrypted is None else "\n".join(self._encrypted)
        return RoundPlan(plan.round, plan.client_ids, settings)

    def aggregate(
        self, round: int, results: Sequence[ClientUpdate], failures: Sequence[Failure], current: Mapping[str, Tensor]
    ) -> AggregateResult | TooFewResults:
        groups = self.partition(current)
        mode = "ckks" if "ckks" in groups else "secagg"
        updates = {u.client_id: u for u in results}
        participants = sorted(updates)
        reports = {cid: int(updates[cid].num_examples) for cid in participants}
        # secagg: the quantizer's max_weight; ckks: the weight is encrypted too and must stay below max_abs
        limit = self.cfg.max_weight if mode == "secagg" else int(self.cfg.ckks_params().max_abs) // 2
        weights = wire.round_weights(reports, limit, uniform=self.uniform)
        layout = TensorLayout.of(current).subset(groups[mode])
        with self._cond:
            self._round = _Round(round, mode, participants, weights, layout,
                                 phase="upload" if mode == "ckks" else "advertise")
            self._cond.notify_all()
        lost = list(failures)
        try:
            if not participants:
                raise RoundAbortedError(f"round {round}: no client sent its update")
            mean, summed, excluded = self._secagg(layout) if mode == "secagg" else self._ckks_round(layout)
        except RoundAbortedError as exc:
            log.warning("round %d: private aggregation aborted: %s", round, exc)
            reason = f"{mode} aggregation aborted: {exc}"
            return TooFewResults(round, self.min_clients, [], lost + [Failure(c, reason, _STAGE) for c in participants])
        finally:
            with self._cond:
                self._close(round)
        named = {cid: f"excluded: {why}" for cid, why in excluded.items() if cid in participants}
        named.update({cid: "dropped: not in the sum" for cid in participants if cid not in summed and cid not in named})
        for cid, why in sorted(named.items()):
            log.warning("round %d: client %s is not in the %s sum (%s)", round, cid, mode, why)
        self.exclusions[round] = named
        lost += [Failure(cid, f"{mode}: {why}", _STAGE) for cid, why in sorted(named.items())]
        merged = [ClientUpdate(cid, {**mean, **updates[cid].tensors}, weights[cid], dict(updates[cid].metrics))
                  for cid in summed]
        result = self.inner.aggregate(round, merged, lost, current)
        if isinstance(result, AggregateResult):
            result.metrics.update(private_summed=float(len(summed)), private_left_out=float(len(named)))
            if self.top:  # the next round ranks tensors by this (public) global update
                self._last = ({k: v.detach().clone() for k, v in current.items()},
                              {k: v.detach().clone() for k, v in result.tensors.items()})
        return result

    def _close(self, round: int) -> None:
        if self._round is not None and self._round.number == round:
            self._round.phase = "done"
            self._round = None
        self._submitted = {cid: n for cid, n in self._submitted.items() if n != round}
        self._cond.notify_all()

    def resume(self, previous: Mapping[str, Tensor] | None, current: Mapping[str, Tensor]) -> None:
        """After a restart from a checkpoint: the global parts before and after the last completed round.

        ``hybrid_top_fraction`` then ranks the next round's tensors as the uninterrupted run would have;
        ``previous=None`` (its checkpoint is gone) leaves every tensor encrypted until a round completes.
        """
        if self.top:
            self._last = None if previous is None else ({k: v.detach().clone() for k, v in previous.items()},
                                                        {k: v.detach().clone() for k, v in current.items()})

    # -- coordinator hooks ---------------------------------------------------------------------
    def partition(self, current: Mapping[str, Tensor]) -> dict[str, list[str]]:
        """Tensor names per mode (``plain`` and one encrypted mode)."""
        if not self.top:
            return wire.partition(self.cfg, current)
        return wire.partition(self.cfg, current, list(current) if self._encrypted is None else self._encrypted)

    def reference(self, current: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The global tensors a ClientUpdate must carry in the clear (checked by the coordinator)."""
        plain = set(self.partition(current).get("plain", []))
        return {k: v for k, v in current.items() if k in plain}

    def attach(self, serve: dict[int, Serve], alive: Callable[[str], bool]) -> None:
        """Serve the Agg* requests; note a participant that rejoins (it gave up on the round)."""
        self._alive = alive
        for kind in AGG_REQUESTS:
            serve[kind] = self.handle
        join = serve[pb.JOIN_ROUND]

        def join_and_note(client_id: str, kind: int, round: int, step: int, request: Any) -> Message:
            with self._cond:
                r = self._round
                if r is not None and client_id in r.participants:
                    r.left.add(client_id)
                    self._cond.notify_all()
            return join(client_id, kind, round, step, request)

        serve[pb.JOIN_ROUND] = join_and_note
        update = serve[pb.CLIENT_UPDATE]

        def update_and_note(client_id: str, kind: int, round: int, step: int, request: Any) -> Message:
            ack = update(client_id, kind, round, step, request)
            with self._cond:
                self._submitted[client_id] = int(request.round)
            return ack

        serve[pb.CLIENT_UPDATE] = update_and_note

    # -- request handling (one thread per client session) --------------------------------------
    def handle(self, client_id: str, kind: int, round: int, step: int, request: Any) -> Message:
        with self._cond:
            r = self._round
            if r is None or r.number != request.round:
                if self._submitted.get(client_id) != request.round or kind not in _WAIT:
                    raise ProtocolError(f"no aggregation of round {request.round} waits for client {client_id} "
                                        f"(over, or its update was not accepted)", code=pb.ABORTED)
                return _WAIT[kind](self.poll_s)  # its update is in; the round has not reached AGGREGATING yet
            if client_id not in r.participants:
                raise ProtocolError(f"client {client_id} is not in round {r.number}'s aggregation",
                                    code=pb.FAILED_PRECONDITION)
            if client_id in r.excluded:
                raise ProtocolError(f"client {client_id} was excluded: {r.excluded[client_id]}", code=pb.ABORTED)
            try:
                reply = self._dispatch(r, client_id, kind, request)
            except ProtocolError as exc:  # malformed: named and excluded, the round goes on
                if exc.code == pb.BAD_REQUEST:
                    r.excluded.setdefault(client_id, str(exc))
                    self._cond.notify_all()
                raise
            self._cond.notify_all()
            return reply

    def _dispatch(self, r: _Round, cid: str, kind: int, request: Any) -> Message:
        handlers: dict[int, Callable[[_Round, str, Any], Message]] = {
            pb.AGG_ADVERTISE: self._advertise, pb.AGG_SHARE_KEYS: self._share_keys,
            pb.AGG_MASKED_INPUT: self._masked_input, pb.AGG_UNMASK_RESPONSE: self._unmask,
            pb.AGG_CKKS_ADVERTISE: self._ckks_advertise, pb.AGG_CKKS_HOLDER: self._ckks_holder,
            pb.AGG_CKKS_UPLOAD: self._ckks_upload, pb.AGG_CKKS_DECRYPTED: self._ckks_decrypted,
        }
        wanted = "ckks" if kind in _CKKS_REQUESTS else "secagg"
        if r.mode != wanted:
            raise ProtocolError(f"round {r.number} aggregates with {r.mode}, not {wanted}", code=pb.FAILED_PRECONDITION)
        return handlers[kind](r, cid, request)

    def _store(self, r: _Round, phase: str, cid: str, request: Message, value: Any) -> bool:
        """Keep the first message of ``cid`` in ``phase``; an identical repeat is a poll (False)."""
        raw = request.SerializeToString(deterministic=True)
        first = r.raw.get((phase, cid))
        if first is None:
            r.raw[(phase, cid)] = raw
            r.box(phase)[cid] = value
            return True
        if first != raw:
            raise ProtocolError(f"client {cid} sent a second, different {phase} message in round {r.number}")
        return False

    def _late(self, r: _Round, cid: str, what: str) -> ProtocolError:
        return ProtocolError(f"round {r.number}: client {cid} is not in the {what} (late, dropped or excluded)",
                             code=pb.ABORTED)

    # -- secagg --------------------------------------------------------------------------------
    def _bounds(self, r: _Round) -> wire.WireBounds:
        return wire.WireBounds(participants=len(r.participants))

    def _advertise(self, r: _Round, cid: str, request: pb.AggAdvertiseKeys) -> pb.AggKeysBroadcast:
        if r.phase == "advertise":
            advert = wire.keys_from_pb(request.advert, f"AggAdvertiseKeys from {cid!r}", count=3)
            if advert.client_id != cid:
                raise ProtocolError(f"AggAdvertiseKeys from {cid!r} names client {advert.client_id!r}")
            self._store(r, "advertise", cid, request, advert)
            return pb.AggKeysBroadcast(wait_s=self.poll_s)
        if r.broadcast is None or cid not in {a.client_id for a in r.broadcast}:
            raise self._late(r, cid, "key broadcast")
        return pb.AggKeysBroadcast(adverts=[wire.keys_to_pb(a) for a in r.broadcast],
                                   num_clients=len(r.participants), weight=r.weights[cid])

    def _share_keys(self, r: _Round, cid: str, request: pb.AggShareKeys) -> pb.AggShares:
        if r.phase == "advertise":
            raise ProtocolError(f"AggShareKeys from {cid!r} before the key broadcast", code=pb.FAILED_PRECONDITION)
        if r.phase == "share":
            shares = wire.shares_from_pb(request.shares, self._bounds(r), f"AggShareKeys from {cid!r}")
            self._store(r, "share", cid, request, shares)
            return pb.AggShares(wait_s=self.poll_s)
        if cid not in r.delivered:
            raise self._late(r, cid, "share delivery")
        return pb.AggShares(shares=wire.shares_to_pb(r.delivered[cid]))

    def _masked_input(self, r: _Round, cid: str, request: pb.AggMaskedInput) -> pb.AggUnmaskRequest:
        if r.phase in ("advertise", "share"):
            raise ProtocolError(f"AggMaskedInput from {cid!r} before the shares", code=pb.FAILED_PRECONDITION)
        if r.phase == "masked":
            expected = (r.layout.numel + 1) * ((self.cfg.ring_bits + 7) // 8)
            masked = wire.masked_from_pb(cid, request, expected, r.participants)
            self._store(r, "masked", cid, request, masked)
            return pb.AggUnmaskRequest(wait_s=self.poll_s)
        if r.request is None or cid not in r.request.survivors:
            raise self._late(r, cid, "survivors")
        return pb.AggUnmaskRequest(survivors=list(r.request.survivors), dropped=list(r.request.dropped))

    def _unmask(self, r: _Round, cid: str, request: pb.AggUnmaskResponse) -> pb.AggAck:
        if r.phase != "unmask" or r.request is None or cid not in r.request.survivors:
            raise self._late(r, cid, "unmasking")
        if request.refused:
            log.warning("round %d: client %s refused the unmask request: %s", r.number, cid, request.refused[:500])
            r.box("unmask")[cid] = None
            return pb.AggAck(accepted=False, reason="refusal noted")
        response = wire.unmask_from_pb(cid, request, self._bounds(r), r.participants)
        self._store(r, "unmask", cid, request, response)
        return pb.AggAck(accepted=True)

    def _secagg(self, layout: TensorLayout) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
        r = self._current()
        params = self.cfg.secagg_params(len(r.participants))
        server = SecAggServer(r.participants, self.identities, params, layout.numel + 1, run_id=self.run_id,
                              round=r.number)
        adverts = self._collect(r, "advertise", r.participants)
        broadcast = server.broadcast_keys(list(adverts.values()))
        self._advance(r, "share", broadcast=broadcast)
        for cid, shares in self._collect(r, "share", [a.client_id for a in broadcast]).items():
            server.receive_shares(cid, shares)
        self._advance(r, "masked", delivered=server.deliver_shares())
        for masked in self._collect(r, "masked", list(r.delivered)).values():
            server.receive_masked(masked)
        for cid, why in r.excluded.items():
            server.excluded.setdefault(cid, why)  # named at the wire: handled as dropped
        request = server.unmask_request()
        _check_several(r.number, request.survivors)  # before any share is revealed
        self._advance(r, "unmask", request=request)
        for response in self._collect(r, "unmask", list(r.request.survivors)).values():
            if response is not None:
                server.receive_unmask(response)
        result = server.finish()
        quantizer = params.quantizer(len(r.participants))
        mean, total = quantizer.decode_mean(result.ring_sum)
        self._check_weight(r, result.clients, total)
        return layout.unflatten(mean), result.clients, {**result.excluded, **r.excluded}

    def _check_weight(self, r: _Round, clients: Sequence[str], total: float) -> None:
        expected = sum(r.weights[c] for c in clients)
        if abs(total - expected) > 1e-3 * max(1, expected):
            raise RoundAbortedError(f"round {r.number}: the summed weight is {total:g}, the summed clients were told "
                                    f"{expected}: a client encoded another weight; nothing aggregated")

    # -- ckks ----------------------------------------------------------------------------------
    def _ckks_advertise(self, r: _Round, cid: str, request: pb.AggCkksAdvertise) -> pb.AggCkksKey:
        key = self._ckks
        reply = pb.AggCkksKey(num_clients=len(r.participants), weight=r.weights[cid], key_id=key.key_id)
        if not key.holder or (not key.key_id and key.holder not in r.participants):
            key.holder = cid  # the first client to ask makes the run's key
        reply.holder = key.holder
        if cid == key.holder:
            if key.key_id and bytes(request.key_id) == key.key_id:
                r.keyed.add(cid)
            return reply
        if key.key_id and bytes(request.key_id) == key.key_id:
            r.keyed.add(cid)
            return reply
        if not request.HasField("advert"):  # it holds no key or an old one: it asks again with a signed key
            reply.wait_s = self.poll_s
            return reply
        advert = wire.keys_from_pb(request.advert, f"AggCkksAdvertise from {cid!r}", count=1)
        try:
            verify_keys(advert, self.identities[cid], self.run_id, CKKS_PURPOSE, CKKS_KEY_ROUND, 1)
        except MalformedMessageError as exc:
            raise ProtocolError(f"AggCkksAdvertise from {cid!r}: {exc}") from None
        mailed = key.mailbox.get(cid)
        if key.holder_advert is not None and mailed is not None and mailed[0] == advert.keys[0]:
            r.keyed.add(cid)
            reply.holder_advert.CopyFrom(wire.keys_to_pb(key.holder_advert))
            reply.sealed = mailed[1].sealed
            return reply
        key.pending[cid] = advert
        reply.wait_s = self.poll_s
        return reply

    def _ckks_holder(self, r: _Round, cid: str, request: pb.AggCkksHolder) -> pb.AggCkksPending:
        key = self._ckks
        if cid != key.holder:
            raise ProtocolError(f"AggCkksHolder from {cid!r}: the key holder is {key.holder!r}",
                                code=pb.FAILED_PRECONDITION)
        bounds = self._bounds(r)
        if request.public_context and bytes(request.key_id) != key.key_id:  # a new key: earlier ones are stale
            advert = wire.keys_from_pb(request.advert, f"AggCkksHolder from {cid!r}", count=1)
            if len(request.public_context) > bounds.max_context_bytes or len(request.key_id) != 32:
                raise ProtocolError(f"AggCkksHolder from {cid!r}: context over {bounds.max_context_bytes} bytes or "
                                    f"a key id of {len(request.key_id)} bytes")
            try:
                verify_keys(advert, self.identities[cid], self.run_id, CKKS_PURPOSE, CKKS_KEY_ROUND, 1)
            except MalformedMessageError as exc:
                raise ProtocolError(f"AggCkksHolder from {cid!r}: {exc}") from None
            _check_keyless(bytes(request.public_context), cid)
            key.holder_advert, key.public_context, key.key_id = advert, bytes(request.public_context), bytes(
                request.key_id)
            key.mailbox.clear()
            r.keyed = {cid}
        if len(request.sealed) > bounds.participants:
            raise ProtocolError(f"AggCkksHolder from {cid!r}: {len(request.sealed)} sealed keys")
        for item in request.sealed:
            sealed = wire.sealed_key_from_pb(item, bounds, f"AggCkksHolder from {cid!r}")
            asked = key.pending.pop(sealed.recipient) if sealed.recipient in key.pending else None
            if sealed.holder == cid and asked is not None:
                key.mailbox[sealed.recipient] = (asked.keys[0], sealed)
        waiting = [c for c in r.participants if c not in r.keyed and self._present(r, c)]
        done = not waiting or r.phase != "upload"
        return pb.AggCkksPending(adverts=[wire.keys_to_pb(key.pending[c]) for c in sorted(key.pending)
                                          if c in r.participants],
                                 done=done, wait_s=0.0 if done else self.poll_s)

    def _ckks_upload(self, r: _Round, cid: str, request: pb.AggCkksUpload) -> pb.AggCkksSum:
        if r.phase == "upload":
            upload = wire.upload_from_pb(cid, request, self.cfg.ckks_params(), r.layout.numel + 1)
            self._store(r, "upload", cid, request, upload)
            return pb.AggCkksSum(wait_s=self.poll_s)
        if r.total is None or cid not in r.total.clients:
            raise self._late(r, cid, "encrypted sum")
        return pb.AggCkksSum(blocks=list(r.total.blocks), clients=r.total.clients)

    def _ckks_decrypted(self, r: _Round, cid: str, request: pb.AggCkksDecrypted) -> pb.AggAck:
        if r.phase != "decrypt" or r.total is None or cid not in r.total.clients:
            raise self._late(r, cid, "decryption")
        length = r.layout.numel + 1
        import torch

        values = decode_tensor(request.sum, f"AggCkksDecrypted from {cid!r}", dtypes=[torch.float64], shape=[length])
        self._store(r, "decrypt", cid, request, values.numpy())
        return pb.AggAck(accepted=True)

    def _ckks_round(self, layout: TensorLayout) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
        r = self._current()
        with self._cond:
            r.phase = "upload"
        uploads = self._collect(r, "upload", r.participants)
        key = self._ckks
        if not key.public_context:
            raise RoundAbortedError(f"round {r.number}: no CKKS key was announced (key holder {key.holder or 'none'})")
        server = CkksServer(key.public_context, key.key_id, r.participants, self.identities, self.cfg.ckks_params(),
                            layout.numel + 1, run_id=self.run_id, round=r.number)
        for upload in uploads.values():
            server.receive(upload)
        total = server.finish()
        _check_several(r.number, total.clients)  # before any client decrypts it
        self._advance(r, "decrypt", total=total)
        decrypted = self._collect(r, "decrypt", total.clients)
        if not decrypted:
            raise RoundAbortedError(f"round {r.number}: no summed client returned the decrypted sum")
        first = next(iter(decrypted.values()))
        for cid, values in decrypted.items():
            if not np.allclose(values, first, rtol=_DECRYPT_RTOL, atol=_DECRYPT_RTOL * max(1.0, np.abs(first).max())):
                raise RoundAbortedError(f"round {r.number}: client {cid}'s decryption of the sum disagrees with the "
                                        f"others'; nothing aggregated")
        self._check_weight(r, total.clients, float(first[-1]))
        mean = first[:-1] / first[-1]
        return layout.unflatten(mean), total.clients, {**server.excluded, **r.excluded}

    # -- phases ----------------------------------------------------------------------------------
    def _current(self) -> _Round:
        assert self._round is not None, "no private round open"
        return self._round

    def _present(self, r: _Round, cid: str) -> bool:
        return cid not in r.left and cid not in r.excluded and self._alive(cid)

    def _collect(self, r: _Round, phase: str, expected: Sequence[str]) -> dict[str, Any]:
        """Wait until every expected client sent its ``phase`` message, left, or the phase timed out."""
        deadline = time.monotonic() + self.phase_timeout_s
        with self._cond:
            while True:
                box = r.box(phase)
                missing = [c for c in expected if c not in box and self._present(r, c)]
                now = time.monotonic()
                if not missing or now >= deadline:
                    if missing:
                        log.warning("round %d: %s phase timed out after %s s without %s", r.number, phase,
                                    self.phase_timeout_s, missing)
                    return {c: box[c] for c in sorted(box) if c in expected and c not in r.excluded}
                self._cond.wait(min(deadline - now, 0.25))  # a disconnect does not notify: look again soon

    def _advance(self, r: _Round, phase: str, **outputs: Any) -> None:
        with self._cond:
            for name, value in outputs.items():
                setattr(r, name, value)
            r.phase = phase
            self._cond.notify_all()


def _check_several(round: int, summed: Sequence[str]) -> None:
    """A sum of one client is that client's update: never released."""
    if len(summed) < 2:
        raise RoundAbortedError(f"round {round}: the sum would hold {len(summed)} client(s) ({', '.join(summed)}); "
                                f"a private sum needs at least 2; round aborted, nothing aggregated")


def _check_keyless(context: bytes, holder: str) -> None:
    import tenseal as ts

    try:
        loaded = ts.context_from(context)
    except Exception as exc:  # noqa: BLE001 - TenSEAL raises several types on bad bytes
        raise ProtocolError(f"AggCkksHolder from {holder!r}: the context does not load: {exc}") from None
    if loaded.is_private():
        raise ProtocolError(f"AggCkksHolder from {holder!r}: the context holds the secret key; the server must not")


_WAIT: dict[int, Callable[[float], Message]] = {
    pb.AGG_ADVERTISE: lambda s: pb.AggKeysBroadcast(wait_s=s),
    pb.AGG_SHARE_KEYS: lambda s: pb.AggShares(wait_s=s),
    pb.AGG_MASKED_INPUT: lambda s: pb.AggUnmaskRequest(wait_s=s),
    pb.AGG_CKKS_ADVERTISE: lambda s: pb.AggCkksKey(wait_s=s),
    pb.AGG_CKKS_HOLDER: lambda s: pb.AggCkksPending(wait_s=s),
    pb.AGG_CKKS_UPLOAD: lambda s: pb.AggCkksSum(wait_s=s),
}


def build_private_strategy(cfg: RunConfig, strategy: Strategy, keys: Path) -> Strategy:
    """``[aggregation]`` around the run's strategy: DP-FedAvg when ``dp_noise`` is set, then the private phases.

    The clients' identities are their admitted ``keys/<id>.pub`` files (the same the handshake checks).
    """
    agg = cfg.aggregation
    if agg.dp_noise != "none":
        if not isinstance(strategy, FedAvg):
            raise ValueError(f"aggregation.dp_noise: DP-FedAvg wraps strategy 'fedavg', got {cfg.strategy.name!r}")
        clients = max(1, len(cfg.security.clients))
        strategy = DPFedAvg(replace(strategy, weight_fn=uniform_weight), clip=agg.dp_clip,
                            noise_multiplier=agg.dp_noise_multiplier, delta=agg.dp_delta,
                            epsilon_budget=agg.dp_epsilon_budget or math.inf, noise=agg.dp_noise,
                            expected_clients=clients if agg.dp_noise == "distributed" else 0,
                            on_budget=agg.dp_on_budget, seed=cfg.train.seed)
    if agg.mode == "plain":
        return strategy
    from fedsplit.security.identity import load_public_key

    identities = {cid: load_public_key(keys / f"{cid}.pub") for cid in cfg.security.clients}
    return PrivateAggregator(strategy, agg, identities, run_id=cfg.security.run_id,
                             phase_timeout_s=cfg.server.step_timeout_s, poll_s=0.1)


def private_frame_bound(agg: AggregationConfig, numel: int, clients: int) -> int:
    """The largest Agg* request frame of a run whose client parts hold ``numel`` values (0 in plain mode)."""
    if agg.mode == "plain":
        return 0
    bounds = wire.WireBounds(participants=max(1, clients))
    masked = (numel + 1) * ((agg.ring_bits + 7) // 8)  # secagg
    shares = clients * (bounds.max_share_bytes + 2 * wire.MAX_ID_LEN + 16)
    largest = max(masked, shares)
    if "ckks" in (agg.mode, agg.hybrid_encrypted_mode):
        params = agg.ckks_params()
        upload = params.num_blocks(numel + 1) * (wire.WireBounds.block_bytes(params) + 8)
        sealed = clients * (2 * wire.WireBounds.block_bytes(params) + 512) + bounds.max_context_bytes  # key holder
        largest = max(largest, upload, sealed)
    return largest + (64 << 10)
