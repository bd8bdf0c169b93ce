"""Private aggregation over real loopback gRPC (issue 9): every mode equals plaintext FedAvg within its
documented bound; dropouts and a malformed share exclude only the client concerned; too many drops
abort the round with the global parts unchanged."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from fedsplit.aggregation.ckks import CkksKeyHolder, CkksUpload
from fedsplit.aggregation.dp import DPFedAvg, uniform_weight
from fedsplit.aggregation.hybrid import top_fraction_set
from fedsplit.aggregation.secagg import EncryptedShare
from fedsplit.channel import Channel
from fedsplit.config import AggregationConfig
from fedsplit.protocol import pb
from fedsplit.server.checkpoint import load_checkpoint
from fedsplit.server.coordinator import RoundFailedError
from fedsplit.strategy import FedAvg

from .private_federation import RUN_ID, RecordingUpdate, make_private_federation

CLIENTS = ["a", "b", "c"]
SIZES = {"a": 2, "b": 3, "c": 1}  # data reports 4, 6, 2: FedAvg weights that differ


def secagg_bound(num_clients: int = 3) -> float:
    return AggregationConfig(mode="secagg").secagg_params(num_clients).quantizer(num_clients).error_bound


def assert_fedavg(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, rtol: float) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, atol=atol, rtol=rtol, msg=key)


class DropAfter(RecordingUpdate):
    """Loses its connection right after the server answered ``kind`` (the server kept the request)."""

    kind = pb.AGG_MASKED_INPUT

    def _poll(self, channel: Channel, kind: int, message: Any, round: int) -> Any:
        reply = super()._poll(channel, kind, message, round)
        if kind == self.kind:
            channel.close()
            raise ConnectionError(f"test: {self.client_id} drops after {pb.Kind.Name(kind)}")
        return reply


class DropAfterShares(DropAfter):
    kind = pb.AGG_SHARE_KEYS


class BadShare(RecordingUpdate):
    """Sends one of its sealed shares with a flipped byte."""

    def send_shares(self, channel: Channel, round: int, shares: list[EncryptedShare]) -> list[EncryptedShare]:
        first = shares[0]
        shares = [EncryptedShare(first.sender, first.recipient, first.sealed[:-1] + bytes([first.sealed[-1] ^ 1])),
                  *shares[1:]]
        return super().send_shares(channel, round, shares)


class ShortMaskedInput(RecordingUpdate):
    """Uploads a masked vector one ring element short."""

    def _poll(self, channel: Channel, kind: int, message: Any, round: int) -> Any:
        if kind == pb.AGG_MASKED_INPUT:
            message.data = message.data[: -((self.cfg.ring_bits + 7) // 8)]
        return super()._poll(channel, kind, message, round)


class ForeignKey(RecordingUpdate):
    """Encrypts under a CKKS key of its own making (signed with its identity), not the run's key."""

    def encrypt(self, vector: np.ndarray, round: int) -> CkksUpload:
        holder = CkksKeyHolder(self.client_id, self.identity, self.peers, self.cfg.ckks_params(), run_id=RUN_ID,
                               round=0)
        return holder.client().encrypt(vector, round)


def test_secagg_over_grpc_equals_fedavg_within_the_quantization_bound(tmp_path):
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), CLIENTS, batch_sizes=SIZES)

    result = fed.run()

    assert result.history[0]["clients"] == CLIENTS
    expected = fed.fedavg(1, CLIENTS)
    assert_fedavg(result.global_adapters, expected, atol=secagg_bound() + 1e-9, rtol=2e-7)
    uniform = {k: sum(fed.privates[c].trained[1][k].double() for c in CLIENTS) / 3 for k in expected}
    assert max(float((uniform[k] - expected[k]).abs().max()) for k in expected) > 1e-4  # the weights matter


def test_distributed_dp_under_secagg_weighs_every_client_1_and_reports_epsilon(tmp_path):
    def dp(inner: FedAvg) -> DPFedAvg:
        return DPFedAvg(replace(inner, weight_fn=uniform_weight), clip=1e6, noise_multiplier=0.0, delta=1e-5,
                        noise="distributed", expected_clients=3)

    agg = AggregationConfig(mode="secagg", dp_noise="distributed")
    fed = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES, strategy=dp)

    result = fed.run()

    fed.reports = dict.fromkeys(CLIENTS, 1)  # DP-FedAvg: equal weights
    assert_fedavg(result.global_adapters, fed.fedavg(1, CLIENTS), atol=secagg_bound() + 1e-9, rtol=2e-7)
    assert "dp_epsilon" in result.history[0]["metrics"]


def test_secagg_client_dropping_after_its_masked_input_still_counts(tmp_path):
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), CLIENTS, batch_sizes=SIZES,
                                  update_cls={"c": DropAfter})

    result = fed.run()

    assert result.history[0]["clients"] == CLIENTS  # its self-mask recovered from the others' shares
    assert_fedavg(result.global_adapters, fed.fedavg(1, CLIENTS), atol=secagg_bound() + 1e-9, rtol=2e-7)


def test_secagg_client_dropping_before_its_masked_input_leaves_fedavg_of_the_survivors(tmp_path):
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), CLIENTS, batch_sizes=SIZES,
                                  update_cls={"b": DropAfterShares})

    result = fed.run()

    assert result.history[0]["clients"] == ["a", "c"]  # b's pairwise masks recovered from its key's shares
    assert "dropped" in fed.coordinator.strategy.exclusions[1]["b"]
    assert_fedavg(result.global_adapters, fed.fedavg(1, ["a", "c"]), atol=secagg_bound() + 1e-9, rtol=2e-7)


def test_secagg_malformed_share_excludes_only_its_sender(tmp_path):
    # 5 clients, t = 3: a's mask key is recovered from the 3 holders other than the one it cheated
    clients = ["a", "b", "c", "d", "e"]
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), clients, update_cls={"a": BadShare})

    result = fed.run()

    assert result.history[0]["clients"] == ["b", "c", "d", "e"]
    assert "rejected its key shares as malformed" in fed.coordinator.strategy.exclusions[1]["a"]
    assert_fedavg(result.global_adapters, fed.fedavg(1, clients[1:]), atol=secagg_bound(5) + 1e-9, rtol=2e-7)


def test_secagg_too_many_drops_abort_the_round_and_keep_the_global_parts(tmp_path, caplog):
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), CLIENTS,
                                  update_cls={"b": DropAfterShares, "c": DropAfterShares})

    with pytest.raises(RoundFailedError, match="round 1: too few results"):
        fed.run()

    assert "1 survivors (a), fewer than the threshold t = 2; dropped or excluded: b, c" in caplog.text

    assert fed.coordinator.completed_round == 0
    for key, value in fed.initial.items():
        assert torch.equal(fed.coordinator.global_adapters[key], value)


def test_ckks_over_grpc_equals_fedavg_within_1e_6_relative(tmp_path):
    pytest.importorskip("tenseal")
    fed = make_private_federation(tmp_path, AggregationConfig(mode="ckks"), CLIENTS, batch_sizes=SIZES)

    result = fed.run()

    assert result.history[0]["clients"] == CLIENTS
    assert_fedavg(result.global_adapters, fed.fedavg(1, CLIENTS), atol=1e-7, rtol=1e-6)


def test_secagg_wrong_size_masked_input_excludes_only_its_sender(tmp_path):
    fed = make_private_federation(tmp_path, AggregationConfig(mode="secagg"), CLIENTS, batch_sizes=SIZES,
                                  update_cls={"b": ShortMaskedInput})

    result = fed.run()

    assert result.history[0]["clients"] == ["a", "c"]
    assert "masked input of" in fed.coordinator.strategy.exclusions[1]["b"]
    assert_fedavg(result.global_adapters, fed.fedavg(1, ["a", "c"]), atol=secagg_bound() + 1e-9, rtol=2e-7)


def test_ckks_upload_under_another_key_excludes_only_its_sender(tmp_path):
    pytest.importorskip("tenseal")
    fed = make_private_federation(tmp_path, AggregationConfig(mode="ckks"), CLIENTS, batch_sizes=SIZES,
                                  update_cls={"c": ForeignKey})

    result = fed.run()

    assert result.history[0]["clients"] == ["a", "b"]
    assert "another CKKS key" in fed.coordinator.strategy.exclusions[1]["c"]
    assert_fedavg(result.global_adapters, fed.fedavg(1, ["a", "b"]), atol=1e-7, rtol=1e-6)


def test_ckks_clients_keep_working_after_a_server_restart_that_forgot_the_key(tmp_path):
    pytest.importorskip("tenseal")
    agg = AggregationConfig(mode="ckks")
    first = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES)
    first.run()
    old_key = {cid: p._ckks.key_id for cid, p in first.privates.items()}

    # Act: a new server process (no CKKS key state), the same client processes with their keys
    second = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES, identities=first.identities,
                                     privates=first.privates)
    for private in first.privates.values():
        private.trained.clear()
    result = second.run()

    assert result.history[0]["clients"] == CLIENTS
    assert_fedavg(result.global_adapters, second.fedavg(1, CLIENTS), atol=1e-7, rtol=1e-6)
    new_key = {cid: p._ckks.key_id for cid, p in second.privates.items()}
    assert len(set(new_key.values())) == 1 and set(new_key.values()) != set(old_key.values())  # re-keyed


def test_hybrid_with_ckks_over_grpc_equals_fedavg(tmp_path):
    pytest.importorskip("tenseal")
    agg = AggregationConfig(mode="hybrid", hybrid_encrypt=["tail/*"], hybrid_encrypted_mode="ckks")
    fed = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES)

    result = fed.run()

    assert result.history[0]["clients"] == CLIENTS
    assert_fedavg(result.global_adapters, fed.fedavg(1, CLIENTS), atol=1e-7, rtol=1e-6)


def test_hybrid_over_grpc_equals_fedavg(tmp_path):
    agg = AggregationConfig(mode="hybrid", hybrid_encrypt=["head/*"])  # the tail travels in the clear
    fed = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES)

    result = fed.run()

    assert result.history[0]["clients"] == CLIENTS
    assert_fedavg(result.global_adapters, fed.fedavg(1, CLIENTS), atol=secagg_bound() + 1e-9, rtol=2e-7)


def test_hybrid_top_fraction_over_grpc_encrypts_the_ranked_top_half_and_equals_fedavg(tmp_path):
    # Arrange: 2 rounds; round 1 has no measured global update (every tensor encrypted), round 2 ranks
    # tensors by the RMS of round 1's global update and encrypts the top half of the parameters
    agg = AggregationConfig(mode="hybrid", hybrid_top_fraction=0.5)
    fed = make_private_federation(tmp_path, agg, CLIENTS, batch_sizes=SIZES, num_rounds=2,
                                  checkpoint_dir=tmp_path / "ckpt")

    # Act
    result = fed.run()

    # Assert: the set is the server's public rule applied to the global parts, and clients used exactly it
    aggregator = fed.coordinator.strategy
    after_round_1 = load_checkpoint(tmp_path / "ckpt" / "round-000001").global_adapters
    expected = top_fraction_set(fed.initial, after_round_1, 0.5)
    sizes = {k: v.numel() for k, v in fed.initial.items()}
    assert aggregator.encrypted_sets == {1: None, 2: tuple(expected)}
    assert 0 < sum(sizes[k] for k in expected) <= 0.5 * sum(sizes.values())
    assert set(expected) != set(sizes)  # some tensors travelled in the clear in round 2
    assert set(aggregator.reference(after_round_1)) == set(sizes) - set(expected)
    assert [h["clients"] for h in result.history] == [CLIENTS, CLIENTS]
    assert_fedavg(result.global_adapters, fed.fedavg(2, CLIENTS), atol=secagg_bound() + 1e-9, rtol=2e-7)
