"""Evaluation FORWARDs cannot watch another client's trunk updates one by one (issue 7, item 6).

Before the fix a client outside the round could evaluate after every trunk step of the others
and see 31 distinct trunk states for 32 honest steps.
"""

from __future__ import annotations

import pytest
import torch

from fedsplit.channel import RemoteError
from fedsplit.protocol import decode_tensor, encode_tensor, pb

from .federation import make_federation


def _eval_request() -> pb.Forward:
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(torch.ones(1, 4, dtype=torch.bool)),
                      position_ids=encode_tensor(torch.arange(4)[None]), train=False)


def test_a_spy_outside_the_round_sees_no_trunk_state_from_inside_the_round():
    # Arrange: "spy" is admitted but takes no part; "a" trains 8 steps over 2 rounds.
    fed = make_federation(["a", "spy"], num_rounds=2, local_steps=4, runners_for=["a"], min_clients=1, join_grace_s=0.0)
    spy = fed.connector("spy")()
    seen = set()

    def probe():
        reply = spy.call(pb.FORWARD, _eval_request())
        seen.add(decode_tensor(reply.hidden, "h").sum().item())

    # Act
    refused = fed.run_probing(probe)

    # Assert: at most the states between rounds (initial, after round 1, after round 2), never a mid-round one.
    assert len(seen) <= 3, f"the spy saw {len(seen)} distinct trunk states"
    assert any("evaluation is served between rounds only" in r or "rate limit" in r for r in refused)


def test_evaluation_is_rate_limited_per_client():
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1, eval_burst=3, eval_per_s=0.001)
    a, b = fed.connector("a")(), fed.connector("b")()

    for _ in range(3):
        a.call(pb.FORWARD, _eval_request())
    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: evaluation rate limit: 3 requests"):
        a.call(pb.FORWARD, _eval_request())
    b.call(pb.FORWARD, _eval_request())  # another client's bucket is its own
