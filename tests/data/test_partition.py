from __future__ import annotations

from collections import Counter

import pytest

from fedsplit.data.partition import dirichlet_partition, iid_partition


def test_iid_partition_deals_every_item_once_in_near_equal_silos() -> None:
    silos = iid_partition(10, 3, seed=0)

    assert sorted(i for s in silos for i in s) == list(range(10))
    assert sorted(len(s) for s in silos) == [3, 3, 4]
    assert silos == iid_partition(10, 3, seed=0)


def test_dirichlet_partition_covers_everything_and_skews_labels() -> None:
    labels = [0] * 60 + [1] * 60 + [2] * 60

    silos = dirichlet_partition(labels, 3, alpha=0.1, seed=1, min_size=4)

    assert sorted(i for s in silos for i in s) == list(range(180))
    assert min(len(s) for s in silos) >= 4
    # small alpha: some client's majority label holds far more than a third of its silo
    shares = [max(Counter(labels[i] for i in s).values()) / len(s) for s in silos]
    assert max(shares) > 0.6


def test_dirichlet_with_large_alpha_is_close_to_iid() -> None:
    labels = [0, 1] * 300

    silos = dirichlet_partition(labels, 3, alpha=1000.0, seed=0)

    for silo in silos:
        assert abs(sum(labels[i] for i in silo) / len(silo) - 0.5) < 0.1


def test_dirichlet_rejects_too_few_items() -> None:
    with pytest.raises(ValueError, match="expected at least 6 items"):
        dirichlet_partition([0, 1, 0], 3, alpha=0.5, seed=0, min_size=2)
