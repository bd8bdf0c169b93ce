"""The bounds that keep one client from taking over the averaged client parts."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.strategy.bounds import cap_shares, l2_distance, linf_distance


def _shares(weights):
    total = sum(weights)
    return [w / total for w in weights]


def test_a_huge_claim_is_capped_at_the_maximum_share():
    capped = cap_shares([float(2**64 - 1), 100.0, 100.0], max_share=0.5)

    assert _shares(capped) == pytest.approx([0.5, 0.25, 0.25])


def test_weights_under_the_cap_are_unchanged():
    assert cap_shares([30.0, 30.0, 40.0], max_share=0.5) == [30.0, 30.0, 40.0]


def test_two_large_weights_are_both_capped_and_the_small_keep_their_ratio():
    capped = cap_shares([1000.0, 900.0, 10.0, 30.0], max_share=0.3)
    shares = _shares(capped)

    assert max(shares) == pytest.approx(0.3)
    assert shares[0] == pytest.approx(shares[1])
    assert shares[3] / shares[2] == pytest.approx(3.0)


def test_cap_below_one_over_n_means_equal_weights():
    assert _shares(cap_shares([5.0, 1.0], max_share=0.1)) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("bad", [0.0, 1.5, math.nan])
def test_cap_rejects_a_bad_share(bad):
    with pytest.raises(ValueError, match="max_share: expected a value in \\(0, 1\\]"):
        cap_shares([1.0, 2.0], bad)


def test_random_weights_never_exceed_the_cap():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        weights = (torch.rand(6, generator=gen) ** 4 * 1000).tolist()
        assert max(_shares(cap_shares(weights, 0.35))) <= 0.35 + 1e-9


def test_distances_find_the_element_that_moved():
    current = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    update = {"a": torch.tensor([[0.0, 0.1], [0.0, 0.0]]), "b": torch.tensor([0.0, -0.5, 0.0])}

    assert linf_distance(update, current) == (pytest.approx(0.5), "b")
    assert l2_distance(update, current) == pytest.approx(math.sqrt(0.26))
