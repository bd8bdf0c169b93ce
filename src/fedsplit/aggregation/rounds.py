"""In-process driver: play every party of one private-aggregation round, honestly or with faults.

The protocol classes (`secagg`, `ckks`) are transport-independent state machines; `run_round` wires
them together in one process the way the round coordinator will over gRPC, relaying every message
through the "server" and counting the bytes each client sends. It is what the tests and
``bench/private_aggregation.py`` use, and the reference for wiring a mode into the coordinator:

* ``plain``: FedAvg of the uploads (`fedsplit.strategy.aggregate.weighted_average`).
* ``secagg``: advertise -> broadcast -> share keys -> deliver -> masked input -> unmask -> finish.
* ``ckks``: (once per run: `setup_ckks`) encrypt + sign -> verify + add -> decrypt.
* ``hybrid``: the policy's partition of the tensors, each part in its mode, one result.

Weights are the clients' ``num_examples`` (integers; secure aggregation masks them too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from torch import Tensor

from fedsplit.aggregation.ckks import CkksClient, CkksKeyHolder, CkksParams, CkksServer, CkksUpload
from fedsplit.aggregation.codec import TensorLayout
from fedsplit.aggregation.errors import RoundAbortedError
from fedsplit.aggregation.hybrid import HybridPolicy
from fedsplit.aggregation.secagg import EncryptedShare, MaskedInput, SecAggClient, SecAggParams
from fedsplit.aggregation.secagg_server import SecAggServer
from fedsplit.strategy.aggregate import weighted_average
from fedsplit.strategy.base import ClientUpdate

__all__ = ["Faults", "RoundReport", "CkksSession", "setup_ckks", "run_round"]


@dataclass(frozen=True)
class Faults:
    """What goes wrong in a simulated round (client ids; pairs are ``(sender, recipient)``)."""

    drop_after_keys: frozenset[str] = frozenset()  # advertised keys, then gone
    drop_after_shares: frozenset[str] = frozenset()  # shared its keys, never uploaded its input
    drop_before_unmask: frozenset[str] = frozenset()  # uploaded, then gone (its input still counts)
    bad_shares: frozenset[tuple[str, str]] = frozenset()  # a corrupted sealed share from sender to recipient
    wrong_size: frozenset[str] = frozenset()  # uploads one element / one block short
    tamper: frozenset[str] = frozenset()  # ciphertext bytes altered after signing (ckks)
    duplicate: frozenset[str] = frozenset()  # uploads twice

    def uploads(self, cid: str) -> bool:
        return cid not in self.drop_after_keys | self.drop_after_shares


@dataclass
class RoundReport:
    """The round's result and what it cost, per party."""

    mode: str
    tensors: dict[str, Tensor]  # the weighted mean of the aggregated clients' tensors
    clients: list[str]  # whose updates are in it
    excluded: dict[str, str]  # client id -> why it was excluded (faults are data)
    num_examples: int
    upload_bytes: dict[str, int] = field(default_factory=dict)  # every message each client sent
    client_seconds: dict[str, float] = field(default_factory=dict)  # CPU seconds of each client's steps
    server_seconds: float = 0.0  # CPU seconds of the server's steps
    error_bound: float = 0.0  # documented max abs error per element vs the exact weighted mean


@dataclass
class CkksSession:
    """The run's CKKS keys: every client's side (shared secret key) and the server's keyless context + key id."""

    params: CkksParams
    clients: dict[str, CkksClient]
    public_context: bytes
    key_id: bytes
    setup_bytes: dict[str, int]
    setup_seconds: float


def setup_ckks(
    client_ids: Sequence[str], identities: Mapping[str, ed25519.Ed25519PrivateKey], params: CkksParams,
    *, run_id: str, round: int = 0,
) -> CkksSession:
    """Key hand-off: the first client (sorted) makes the keys and seals the secret context for each other."""
    start = time.process_time()
    ids = sorted(client_ids)
    peers = {cid: identities[cid].public_key() for cid in ids}
    holder = CkksKeyHolder(ids[0], identities[ids[0]], peers, params, run_id=run_id, round=round)
    others = {cid: CkksClient(cid, identities[cid], peers, params, run_id=run_id, round=round) for cid in ids[1:]}
    holder_advert = holder.advertise()
    adverts = [client.advertise() for client in others.values()]
    sealed, refused = holder.seal_for(adverts)  # relayed by the server, which cannot open them
    if refused:
        raise RoundAbortedError(f"ckks key set-up: adverts refused by the key holder: {refused}")
    for message in sealed:
        others[message.recipient].receive_key(holder_advert, message)
    sizes = {cid: 32 + 64 + len(cid) for cid in ids}
    sizes[ids[0]] += sum(len(m.sealed) for m in sealed) + len(holder.public_context)
    clients = {ids[0]: holder.client(), **others}
    return CkksSession(params, clients, holder.public_context, holder.key_id, sizes, time.process_time() - start)


def run_round(
    mode: str,
    updates: Sequence[ClientUpdate],
    *,
    identities: Mapping[str, ed25519.Ed25519PrivateKey] | None = None,
    run_id: str = "fedsplit-run",
    round: int = 1,
    secagg: SecAggParams | None = None,
    ckks: CkksSession | None = None,
    policy: HybridPolicy | None = None,
    faults: Faults | None = None,
) -> RoundReport:
    """Aggregate ``updates`` (weights: ``num_examples``) in ``mode``; see the module docstring."""
    faults = faults or Faults()
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"updates: expected one update per client, got {ids}")
    layout = TensorLayout.of(updates[0].tensors)
    if mode == "hybrid":
        if policy is None:
            raise ValueError("mode hybrid: expected a policy")
        groups = policy.partition(layout.names)
    elif mode in ("plain", "secagg", "ckks"):
        groups = {mode: list(layout.names)}
    else:
        raise ValueError(f"mode: expected plain, secagg, ckks or hybrid, got {mode!r}")
    if identities is None and set(groups) - {"plain"}:
        identities = {cid: ed25519.Ed25519PrivateKey.generate() for cid in ids}
    parts = []
    for part_mode, names in sorted(groups.items(), key=lambda kv: kv[0] == "plain"):  # plain last
        sub = layout.subset(names)
        if part_mode == "secagg":
            assert identities is not None
            parts.append(_secagg(updates, sub, identities, secagg or SecAggParams(threshold=len(ids) // 2 + 1),
                                 run_id, round, faults))
        elif part_mode == "ckks":
            assert identities is not None
            session = ckks or setup_ckks(ids, identities, CkksParams(), run_id=run_id)
            parts.append(_ckks(updates, sub, identities, session, run_id, round, faults))
        else:
            included = parts[0].clients if parts else None  # plaintext follows the encrypted parts' outcome
            parts.append(_plain(updates, sub, faults, included))
    return _combine(mode, parts)


def _combine(mode: str, parts: list[RoundReport]) -> RoundReport:
    clients = parts[0].clients
    for part in parts[1:]:
        if part.clients != clients:
            raise RoundAbortedError(
                f"hybrid round: the parts aggregated different clients ({[p.clients for p in parts]}); aborted"
            )
    out = RoundReport(mode=mode, tensors={}, clients=clients, excluded={}, num_examples=parts[0].num_examples)
    for part in parts:
        out.tensors.update(part.tensors)
        for cid, reason in part.excluded.items():
            out.excluded.setdefault(cid, f"{part.mode}: {reason}")
        for cid, nbytes in part.upload_bytes.items():
            out.upload_bytes[cid] = out.upload_bytes.get(cid, 0) + nbytes
        for cid, seconds in part.client_seconds.items():
            out.client_seconds[cid] = out.client_seconds.get(cid, 0.0) + seconds
        out.server_seconds += part.server_seconds
        out.error_bound = max(out.error_bound, part.error_bound)
    return out


def _plain(
    updates: Sequence[ClientUpdate], layout: TensorLayout, faults: Faults, included: list[str] | None
) -> RoundReport:
    start = time.process_time()
    chosen = [u for u in updates if faults.uploads(u.client_id) and (included is None or u.client_id in included)]
    if not chosen:
        raise RoundAbortedError("plain round: no client uploaded; aborted")
    pairs = [({n: u.tensors[n] for n in layout.names}, float(u.num_examples)) for u in chosen]
    tensors = weighted_average(pairs, labels=[u.client_id for u in chosen])
    sizes = {u.client_id: sum(u.tensors[n].numel() * u.tensors[n].element_size() for n in layout.names) + 8
             for u in chosen}
    return RoundReport(
        mode="plain", tensors=tensors, clients=sorted(u.client_id for u in chosen), excluded={},
        num_examples=sum(u.num_examples for u in chosen), upload_bytes=sizes,
        client_seconds={u.client_id: 0.0 for u in chosen}, server_seconds=time.process_time() - start,
    )


class _Clock:
    """CPU seconds per party (process time: includes any worker threads of that party's step)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, party: str, fn, *args):  # type: ignore[no-untyped-def]
        start = time.process_time()
        try:
            return fn(*args)
        finally:
            self.seconds[party] = self.seconds.get(party, 0.0) + time.process_time() - start


def _secagg(
    updates: Sequence[ClientUpdate], layout: TensorLayout, identities: Mapping[str, ed25519.Ed25519PrivateKey],
    params: SecAggParams, run_id: str, round: int, faults: Faults,
) -> RoundReport:
    ids = sorted(u.client_id for u in updates)
    by_id = {u.client_id: u for u in updates}
    peers = {cid: identities[cid].public_key() for cid in ids}
    quantizer = params.quantizer(len(ids))
    clock, sent = _Clock(), dict.fromkeys(ids, 0)
    clients = {cid: SecAggClient(cid, identities[cid], peers, params, run_id=run_id, round=round) for cid in ids}
    server = SecAggServer(ids, peers, params, layout.numel + 1, run_id=run_id, round=round)
    adverts = []
    for cid in ids:
        advert = clock.run(cid, clients[cid].advertise)
        sent[cid] += sum(len(k) for k in advert.keys) + len(advert.signature) + len(cid) + 16
        adverts.append(advert)
    broadcast = clock.run("server", server.broadcast_keys, adverts)
    for cid in ids:
        if cid in faults.drop_after_keys:
            continue
        shares = clock.run(cid, clients[cid].share_keys, broadcast)
        shares = [_corrupt(m) if (m.sender, m.recipient) in faults.bad_shares else m for m in shares]
        sent[cid] += sum(m.nbytes for m in shares)
        clock.run("server", server.receive_shares, cid, shares)
    delivered = clock.run("server", server.deliver_shares)
    for cid in ids:
        if cid not in delivered or cid in faults.drop_after_shares:
            continue
        values = layout.flatten({n: by_id[cid].tensors[n] for n in layout.names})
        encoded, _ = clock.run(cid, quantizer.encode, values, by_id[cid].num_examples)
        masked = clock.run(cid, clients[cid].mask_input, encoded, delivered[cid])
        if cid in faults.wrong_size:
            masked = MaskedInput(cid, masked.data[: -quantizer.element_bytes], masked.masked_with, masked.rejected)
        for _ in range(2 if cid in faults.duplicate else 1):
            sent[cid] += masked.nbytes
            clock.run("server", server.receive_masked, masked)
    request = clock.run("server", server.unmask_request)
    for cid in request.survivors:
        if cid in faults.drop_before_unmask:
            continue
        response = clock.run(cid, clients[cid].unmask, request)
        sent[cid] += response.nbytes
        clock.run("server", server.receive_unmask, response)
    result = clock.run("server", server.finish)
    mean, total = clock.run("server", quantizer.decode_mean, result.ring_sum)
    return RoundReport(
        mode="secagg", tensors=layout.unflatten(mean), clients=result.clients, excluded=result.excluded,
        num_examples=total, upload_bytes=sent, client_seconds={c: clock.seconds.get(c, 0.0) for c in ids},
        server_seconds=clock.seconds.get("server", 0.0), error_bound=quantizer.error_bound,
    )


def _corrupt(message: EncryptedShare) -> EncryptedShare:
    flipped = bytes([message.sealed[-1] ^ 0x01])
    return EncryptedShare(message.sender, message.recipient, message.sealed[:-1] + flipped)


def _ckks(
    updates: Sequence[ClientUpdate], layout: TensorLayout, identities: Mapping[str, ed25519.Ed25519PrivateKey],
    session: CkksSession, run_id: str, round: int, faults: Faults,
) -> RoundReport:
    ids = sorted(u.client_id for u in updates)
    peers = {cid: identities[cid].public_key() for cid in ids}
    clock, sent = _Clock(), dict.fromkeys(ids, 0)
    length = layout.numel + 1
    server = CkksServer(session.public_context, session.key_id, ids, peers, session.params, length,
                        run_id=run_id, round=round)
    for update in sorted(updates, key=lambda u: u.client_id):
        cid = update.client_id
        if not faults.uploads(cid):
            continue
        weight = float(update.num_examples)
        values = layout.flatten({n: update.tensors[n] for n in layout.names})
        vector = np.append(values * weight, weight)  # (numel + 1,): [w x ..., w]
        upload = clock.run(cid, session.clients[cid].encrypt, vector, round)
        if cid in faults.tamper:
            first = upload.blocks[0]
            upload = CkksUpload(cid, round, upload.key, (first[:-9] + bytes([first[-9] ^ 1]) + first[-8:],)
                                + upload.blocks[1:], upload.signature)
        if cid in faults.wrong_size:
            upload = CkksUpload(cid, round, upload.key, upload.blocks[:-1], upload.signature)
        for _ in range(2 if cid in faults.duplicate else 1):
            sent[cid] += upload.nbytes
            clock.run("server", server.receive, upload)
    total = clock.run("server", server.finish)
    sums = {}
    for cid in total.clients:  # every client decrypts the sum itself
        if cid not in faults.drop_before_unmask:
            sums[cid] = clock.run(cid, session.clients[cid].decrypt, total, length)
    summed = next(iter(sums.values()))
    mean = summed[:-1] / summed[-1]
    bound = 1e-6 * max(1.0, float(np.abs(mean).max()))
    return RoundReport(
        mode="ckks", tensors=layout.unflatten(mean), clients=total.clients, excluded=total.excluded,
        num_examples=int(np.rint(summed[-1])), upload_bytes=sent,
        client_seconds={c: clock.seconds.get(c, 0.0) for c in ids}, server_seconds=clock.seconds.get("server", 0.0),
        error_bound=bound,
    )

