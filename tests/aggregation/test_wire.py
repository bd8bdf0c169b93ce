"""The Agg* wire conversions bound everything a client sends before it is parsed further."""

from __future__ import annotations

import pytest

from fedsplit.aggregation import wire
from fedsplit.aggregation.ckks import CkksParams
from fedsplit.aggregation.keys import KeyPair, sign_keys
from fedsplit.config import AggregationConfig
from fedsplit.protocol import ProtocolError, pb
from fedsplit.security.identity import generate_identity

PARTICIPANTS = ["a", "b", "c"]


def test_signed_keys_round_trip_through_protobuf():
    advert = sign_keys(generate_identity(), "run", "a", "secagg", 3, (KeyPair.generate().public_raw,) * 3)

    back = wire.keys_from_pb(pb.AggSignedKeys.FromString(wire.keys_to_pb(advert).SerializeToString()), "t", count=3)

    assert back == advert


@pytest.mark.parametrize("keys, signature", [([b"k" * 32] * 2, b"s" * 64), ([b"k" * 31] * 3, b"s" * 64),
                                             ([b"k" * 32] * 3, b"s" * 63)])
def test_signed_keys_of_the_wrong_count_or_size_are_refused(keys, signature):
    message = pb.AggSignedKeys(client_id="a", purpose="secagg", round=1, keys=keys, signature=signature)

    with pytest.raises(ProtocolError, match="expected"):
        wire.keys_from_pb(message, "advert", count=3)


def test_too_many_or_oversized_shares_are_refused():
    bounds = wire.WireBounds(participants=3)
    share = pb.AggShare(sender="a", recipient="b", sealed=b"x" * 100)

    with pytest.raises(ProtocolError, match="at most 3 shares"):
        wire.shares_from_pb([share] * 4, bounds, "shares")
    with pytest.raises(ProtocolError, match="sealed share of 2000 bytes"):
        wire.shares_from_pb([pb.AggShare(sender="a", recipient="b", sealed=b"x" * 2000)], bounds, "shares")
    assert len(wire.shares_from_pb([share] * 3, bounds, "shares")) == 3


def test_masked_input_longer_than_the_vector_or_naming_strangers_is_refused():
    with pytest.raises(ProtocolError, match="13 bytes, expected 12"):
        wire.masked_from_pb("a", pb.AggMaskedInput(data=b"x" * 13), 12, PARTICIPANTS)
    with pytest.raises(ProtocolError, match="not in the round"):
        wire.masked_from_pb("a", pb.AggMaskedInput(data=b"x" * 12, masked_with=["z"]), 12, PARTICIPANTS)
    with pytest.raises(ProtocolError, match="distinct"):
        wire.masked_from_pb("a", pb.AggMaskedInput(data=b"", masked_with=["b", "b"]), 12, PARTICIPANTS)


def test_ckks_upload_with_too_many_or_too_large_blocks_is_refused():
    params = CkksParams()
    good = pb.AggCkksUpload(round=1, key_id=b"k" * 32, blocks=[b"c" * 100], signature=b"s" * 64)

    assert wire.upload_from_pb("a", good, params, 10).blocks == (b"c" * 100,)
    with pytest.raises(ProtocolError, match="2 ciphertext blocks, expected 1"):
        wire.upload_from_pb("a", pb.AggCkksUpload(key_id=b"k" * 32, blocks=[b"c"] * 2, signature=b"s" * 64),
                            params, 10)
    huge = b"c" * (wire.WireBounds.block_bytes(params) + 1)
    with pytest.raises(ProtocolError, match="over"):
        wire.upload_from_pb("a", pb.AggCkksUpload(key_id=b"k" * 32, blocks=[huge], signature=b"s" * 64), params, 10)


def test_hybrid_partition_has_a_plain_and_one_encrypted_part():
    names = ["head/x", "tail/model.layers.0.q", "tail/model.layers.1.q"]

    groups = wire.partition(AggregationConfig(mode="hybrid"), names)

    assert groups == {"secagg": ["head/x", "tail/model.layers.1.q"], "plain": ["tail/model.layers.0.q"]}
    assert wire.partition(AggregationConfig(mode="ckks"), names) == {"ckks": sorted(names)}


def test_round_weights_are_data_reports_scaled_down_together_above_the_limit_or_1_under_dp():
    assert wire.round_weights({"a": 4, "b": 6}, 4096, uniform=False) == {"a": 4, "b": 6}
    assert wire.round_weights({"a": 5000, "b": 10000}, 4096, uniform=False) == {"a": 2048, "b": 4096}
    assert wire.round_weights({"a": 4, "b": 6}, 4096, uniform=True) == {"a": 1, "b": 1}
