"""A client's check of the server's ``hybrid_top_fraction`` set before anything leaves it (issue 9)."""

from __future__ import annotations

import pytest
import torch

from fedsplit.client.private_update import PrivateRoundError, PrivateUpdate
from fedsplit.config import AggregationConfig
from fedsplit.protocol import pb
from fedsplit.security.identity import generate_identity

TENSORS = {f"head/t{i}": torch.zeros(10) for i in range(4)}


def client() -> PrivateUpdate:
    identity = generate_identity()
    return PrivateUpdate("a", AggregationConfig(mode="hybrid", hybrid_top_fraction=0.5), identity,
                         {"a": identity.public_key(), "b": generate_identity().public_key()}, run_id="r")


def plan(**settings: str) -> pb.RoundPlan:
    return pb.RoundPlan(round=2, settings=dict(settings, aggregation="hybrid"))


def test_the_client_takes_a_well_formed_set_and_everything_before_any_measurement():
    assert client()._encrypted_set(plan(hybrid_encrypted="head/t3\nhead/t1"), TENSORS) == ["head/t1", "head/t3"]
    assert client()._encrypted_set(plan(hybrid_encrypted="*"), TENSORS) == sorted(TENSORS)


@pytest.mark.parametrize(("encrypted", "message"), [
    (None, "names no encrypted tensors"),
    ("head/t0", "the server encrypts less than configured"),
    ("head/t0\nhead/t1\nhead/t2", "expected at most fraction 0.5"),
    ("head/t0\nhead/forged", "not among this client's tensors"),
])
def test_the_client_refuses_a_set_that_encrypts_less_or_names_other_tensors(encrypted, message):
    settings = {} if encrypted is None else {"hybrid_encrypted": encrypted}

    with pytest.raises(PrivateRoundError, match=message):
        client()._encrypted_set(plan(**settings), TENSORS)
