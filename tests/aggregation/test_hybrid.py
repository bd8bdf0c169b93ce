"""Hybrid encrypted/plaintext aggregation: the policy, the sensitivity ranking, and a hybrid round."""

from __future__ import annotations

import pytest
import torch

from fedsplit.aggregation.hybrid import (
    HybridPolicy,
    check_top_fraction,
    default_policy,
    sensitivity_policy,
    top_fraction_set,
    update_sensitivity,
)
from fedsplit.aggregation.rounds import run_round
from fedsplit.aggregation.secagg import SecAggParams
from fedsplit.strategy import ClientUpdate, weighted_average

PREFIX = "base_model.model.model.layers"
NAMES = [
    f"head/{PREFIX}.0.self_attn.q_proj.lora_A.weight",
    f"head/{PREFIX}.0.self_attn.q_proj.lora_B.weight",
    f"tail/{PREFIX}.28.self_attn.v_proj.lora_A.weight",
    f"tail/{PREFIX}.29.self_attn.q_proj.lora_A.weight",
    f"tail/{PREFIX}.29.self_attn.q_proj.lora_B.weight",
]


def test_default_policy_encrypts_head_and_the_last_tail_block() -> None:
    policy = default_policy(NAMES, "ckks")
    modes = {name: policy.mode_of(name) for name in NAMES}
    assert [modes[n] for n in NAMES] == ["ckks", "ckks", "plain", "ckks", "ckks"]
    assert policy.partition(NAMES) == {"ckks": sorted(NAMES[:2] + NAMES[3:]), "plain": [NAMES[2]]}


def test_policy_rejects_unknown_modes_and_first_match_wins() -> None:
    with pytest.raises(ValueError, match="expected mode"):
        HybridPolicy(rules=(("head/*", "rot13"),))
    policy = HybridPolicy(rules=(("head/*lora_B*", "plain"), ("head/*", "secagg")))
    assert policy.mode_of(NAMES[1]) == "plain" and policy.mode_of(NAMES[0]) == "secagg"


def test_sensitivity_ranks_by_update_rms_up_to_the_parameter_fraction() -> None:
    previous = {n: torch.zeros(10) for n in NAMES}
    current = {n: torch.full((10,), float(i)) for i, n in enumerate(NAMES)}
    sensitivity = update_sensitivity(previous, current)
    assert sensitivity[NAMES[4]] == pytest.approx(4.0)
    policy = sensitivity_policy(sensitivity, {n: 10 for n in NAMES}, fraction=0.4)
    assert [policy.mode_of(n) for n in NAMES] == ["plain", "plain", "plain", "secagg", "secagg"]
    at_least_one = sensitivity_policy(sensitivity, {n: 10 for n in NAMES}, fraction=0.01)
    assert at_least_one.partition(NAMES)["secagg"] == [NAMES[4]]


def test_top_fraction_set_is_the_ranked_fill_and_clients_accept_exactly_well_formed_sets() -> None:
    previous = {n: torch.zeros(10) for n in NAMES}
    current = {n: torch.full((10,), float(i)) for i, n in enumerate(NAMES)}
    sizes = {n: 10 for n in NAMES}

    chosen = top_fraction_set(previous, current, 0.4)

    assert chosen == sorted(NAMES[3:])
    assert check_top_fraction(chosen, sizes, 0.4) == chosen
    assert check_top_fraction(NAMES[:2], sizes, 0.4) == sorted(NAMES[:2])  # another ranking: same amount
    assert check_top_fraction(NAMES, sizes, 0.4) == sorted(NAMES)  # nothing measured yet: all encrypted
    with pytest.raises(ValueError, match="leaves out .* which fit"):
        check_top_fraction(NAMES[4:], sizes, 0.4)  # the server encrypts less than configured
    with pytest.raises(ValueError, match="expected at most fraction 0.4"):
        check_top_fraction(NAMES[2:], sizes, 0.4)
    with pytest.raises(ValueError, match="not among this client's tensors"):
        check_top_fraction([NAMES[0], "head/forged"], sizes, 0.4)
    with pytest.raises(ValueError, match="distinct"):
        check_top_fraction([NAMES[0], NAMES[0]], sizes, 0.4)


def test_hybrid_round_equals_fedavg_and_uploads_less_than_all_encrypted() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(f"c{i}", {n: torch.randn(8, 32, generator=gen) * 0.1 for n in NAMES}, 4 + i, {})
               for i in range(5)]
    params = SecAggParams(threshold=3)
    hybrid = run_round("hybrid", updates, secagg=params, policy=default_policy(NAMES))
    full = run_round("secagg", updates, secagg=params)
    exact = weighted_average([(u.tensors, float(u.num_examples)) for u in updates])
    error = max(float((hybrid.tensors[n] - exact[n]).abs().max()) for n in NAMES)
    assert error <= hybrid.error_bound + 1e-7
    assert torch.equal(hybrid.tensors[NAMES[2]], exact[NAMES[2]])  # the plaintext tensor is exact
    assert sum(hybrid.upload_bytes.values()) < sum(full.upload_bytes.values())
