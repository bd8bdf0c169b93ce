"""Secure aggregation (SecAgg+): equals FedAvg within the quantization bound, survives dropouts and faults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.aggregation.codec import unpack_ring
from fedsplit.aggregation.errors import (
    MalformedMessageError,
    ProtocolStageError,
    RoundAbortedError,
    UnmaskRefusedError,
)
from fedsplit.aggregation.keys import SignedKeys
from fedsplit.aggregation.rounds import Faults, run_round
from fedsplit.aggregation.secagg import SecAggClient, SecAggParams, UnmaskRequest, neighbourhoods
from fedsplit.aggregation.secagg_server import SecAggServer
from fedsplit.strategy import ClientUpdate, weighted_average

NAMES = ("head/layers.0.q.lora_A.weight", "head/layers.0.q.lora_B.weight", "tail/layers.5.v.lora_A.weight")


def _updates(n: int, seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"client-{i}", {name: torch.randn(4, 16, generator=gen) * 0.1 for name in NAMES}, 3 + 7 * i, {})
        for i in range(n)
    ]


def _fedavg(updates: list[ClientUpdate], ids: list[str] | None = None) -> dict[str, torch.Tensor]:
    chosen = [u for u in updates if ids is None or u.client_id in ids]
    return weighted_average([(u.tensors, float(u.num_examples)) for u in chosen])


def _max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_equals_fedavg_within_the_quantization_bound_n10() -> None:
    updates = _updates(10)
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=6))
    assert report.clients == sorted(u.client_id for u in updates) and report.excluded == {}
    assert report.num_examples == sum(u.num_examples for u in updates)
    # float32 outputs: the bound plus one float32 rounding of values ~0.3
    assert _max_error(report.tensors, _fedavg(updates)) <= report.error_bound + 1e-7
    assert report.error_bound < 1e-8


def test_sparse_neighbourhoods_equal_fedavg() -> None:
    updates = _updates(10, seed=1)
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=3, neighbours=4),
                       faults=Faults(drop_after_shares=frozenset({"client-2"})))
    ids = [u.client_id for u in updates if u.client_id != "client-2"]
    assert report.clients == ids
    assert _max_error(report.tensors, _fedavg(updates, ids)) <= report.error_bound + 1e-7


def test_two_of_five_drop_after_sharing_keys_gives_fedavg_of_the_three_survivors() -> None:
    updates = _updates(5)
    dropped = frozenset({"client-1", "client-3"})
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=3), faults=Faults(drop_after_shares=dropped))
    survivors = ["client-0", "client-2", "client-4"]
    assert report.clients == survivors
    assert _max_error(report.tensors, _fedavg(updates, survivors)) <= report.error_bound + 1e-7


def test_clients_gone_after_uploading_still_count() -> None:
    updates = _updates(5)
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=3),
                       faults=Faults(drop_before_unmask=frozenset({"client-0", "client-4"})))
    assert len(report.clients) == 5
    assert _max_error(report.tensors, _fedavg(updates)) <= report.error_bound + 1e-7


def test_too_many_drops_abort_the_round_with_a_clear_message() -> None:
    updates = _updates(5)
    with pytest.raises(RoundAbortedError, match=r"2 survivors .* fewer than the threshold t = 3.*aborted"):
        run_round("secagg", updates, secagg=SecAggParams(threshold=3),
                  faults=Faults(drop_after_shares=frozenset({"client-0", "client-1", "client-2"})))
    with pytest.raises(RoundAbortedError, match="shares of the self-mask seed"):
        run_round("secagg", updates, secagg=SecAggParams(threshold=3),
                  faults=Faults(drop_after_shares=frozenset({"client-0", "client-1"}),
                                drop_before_unmask=frozenset({"client-2"})))


def test_malformed_share_names_and_excludes_its_sender() -> None:
    updates = _updates(6)
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=4),
                       faults=Faults(bad_shares=frozenset({("client-1", "client-2")})))
    assert "client-1" in report.excluded and "rejected its key shares" in report.excluded["client-1"]
    rest = [u.client_id for u in updates if u.client_id != "client-1"]
    assert report.clients == rest
    assert _max_error(report.tensors, _fedavg(updates, rest)) <= report.error_bound + 1e-7


@pytest.mark.parametrize("fault", ["wrong_size", "duplicate"])
def test_wrong_size_or_repeated_upload_excluded_not_aggregated_twice(fault: str) -> None:
    updates = _updates(6)
    report = run_round("secagg", updates, secagg=SecAggParams(threshold=4),
                       faults=Faults(**{fault: frozenset({"client-3"})}))
    assert list(report.excluded) == ["client-3"]
    rest = [u.client_id for u in updates if u.client_id != "client-3"]
    assert report.clients == rest and report.num_examples == sum(u.num_examples for u in updates if u.client_id in rest)
    assert _max_error(report.tensors, _fedavg(updates, rest)) <= report.error_bound + 1e-7


class _Round:
    """All parties of one round, driven by hand up to the unmask request."""

    def __init__(self, n: int, params: SecAggParams, vector_len: int = 1001) -> None:
        self.ids = [f"c{i}" for i in range(n)]
        self.keys = {cid: ed25519.Ed25519PrivateKey.generate() for cid in self.ids}
        peers = {cid: key.public_key() for cid, key in self.keys.items()}
        self.clients = {c: SecAggClient(c, self.keys[c], peers, params, run_id="run", round=2) for c in self.ids}
        self.server = SecAggServer(self.ids, peers, params, vector_len, run_id="run", round=2)
        self.vector_len = vector_len

    def to_upload(self) -> dict:
        broadcast = self.server.broadcast_keys([self.clients[c].advertise() for c in self.ids])
        for cid in self.ids:
            self.server.receive_shares(cid, self.clients[cid].share_keys(broadcast))
        return self.server.deliver_shares()


def test_unmask_request_naming_a_client_survivor_and_dropped_is_refused() -> None:
    game = _Round(5, SecAggParams(threshold=3))
    delivered = game.to_upload()
    for cid in game.ids:
        game.clients[cid].mask_input(np.zeros(game.vector_len, dtype=np.uint64), delivered[cid])
    overlap = UnmaskRequest(survivors=("c0", "c1", "c2", "c3"), dropped=("c3", "c4"))
    with pytest.raises(UnmaskRefusedError, match=r"\['c3'\] both as survivor and as dropped"):
        game.clients["c0"].unmask(overlap)
    too_few = UnmaskRequest(survivors=("c0", "c1"), dropped=("c2", "c3", "c4"))
    with pytest.raises(UnmaskRefusedError, match="fewer than the threshold"):
        game.clients["c0"].unmask(too_few)
    with pytest.raises(UnmaskRefusedError, match="not named as a survivor"):
        game.clients["c4"].unmask(UnmaskRequest(survivors=("c0", "c1", "c2"), dropped=("c4",)))


def test_masked_uploads_look_uniform() -> None:
    params = SecAggParams(threshold=2, ring_bits=48)
    game = _Round(3, params, vector_len=20001)
    delivered = game.to_upload()
    zeros = np.zeros(game.vector_len, dtype=np.uint64)  # the most structured input there is
    masked = game.clients["c0"].mask_input(zeros, delivered["c0"])
    data = np.frombuffer(masked.data, dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2_bytes = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_bytes < 330.5  # 99.9 % quantile of chi-square with 255 degrees of freedom
    top = unpack_ring(masked.data, 48, game.vector_len) >> np.uint64(44)  # top 4 bits of each element
    counts = np.bincount(top.astype(np.int64), minlength=16)
    expected = top.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 37.7  # 99.9 % quantile, 15 dof


def test_server_cannot_substitute_keys() -> None:
    game = _Round(3, SecAggParams(threshold=2))
    adverts = [game.clients[c].advertise() for c in game.ids]
    broadcast = game.server.broadcast_keys(adverts)
    keys = (b"\x09" * 32,) + broadcast[1].keys[1:]  # the server swaps in its own encryption key
    forged = SignedKeys(broadcast[1].client_id, "secagg", 2, keys, broadcast[1].signature)
    with pytest.raises(MalformedMessageError, match="signature"):
        game.clients["c0"].share_keys([broadcast[0], forged, broadcast[2]])


def test_server_excludes_a_badly_signed_advert_and_stages_are_enforced() -> None:
    game = _Round(4, SecAggParams(threshold=2))
    adverts = [game.clients[c].advertise() for c in game.ids]
    adverts[3] = SignedKeys("c3", "secagg", 2, adverts[3].keys, b"\x00" * 64)
    broadcast = game.server.broadcast_keys(adverts)
    assert [a.client_id for a in broadcast] == ["c0", "c1", "c2"] and "c3" in game.server.excluded
    with pytest.raises(ProtocolStageError):
        game.clients["c0"].unmask(UnmaskRequest(("c0",), ()))
    with pytest.raises(ProtocolStageError):
        game.server.finish()


def test_neighbourhoods_are_symmetric_and_of_degree_k() -> None:
    ids = [f"c{i}" for i in range(11)]
    graph = neighbourhoods(ids, 4, b"seed")
    for cid, peers in graph.items():
        assert len(peers) == 4 and cid not in peers
        assert all(cid in graph[p] for p in peers)
    assert neighbourhoods(ids, 0, b"seed")["c0"] == frozenset(ids) - {"c0"}


def test_threshold_must_be_a_majority_of_the_sharing_group() -> None:
    with pytest.raises(ValueError, match="threshold"):
        run_round("secagg", _updates(6), secagg=SecAggParams(threshold=3))  # 3 of 6 is not a majority
