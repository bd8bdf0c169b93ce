"""The bounds that keep one client from taking over the averaged client parts."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.strategy.aggregate import cap_shares
from fedsplit.strategy.bounds import l2_distance, linf_distance


def test_a_huge_claim_is_capped_at_the_maximum_share():
    assert cap_shares([float(2**64 - 1), 100.0, 100.0], max_share=0.5) == pytest.approx([0.5, 0.25, 0.25])


def test_distances_find_the_element_that_moved():
    current = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    update = {"a": torch.tensor([[0.0, 0.1], [0.0, 0.0]]), "b": torch.tensor([0.0, -0.5, 0.0])}

    assert linf_distance(update, current) == (pytest.approx(0.5), "b")
    assert l2_distance(update, current) == pytest.approx(math.sqrt(0.26))
