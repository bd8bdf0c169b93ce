"""Tests for fedsplit.data.partition: every split is a deterministic partition of the pool with the
promised proportions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedsplit.data.partition import by_field, dirichlet_labels, iid, partition, quantity_skew


def _is_partition(shards: list[list[int]], n: int) -> bool:
    flat = [i for shard in shards for i in shard]
    return sorted(flat) == list(range(n)) and all(shard == sorted(shard) and shard for shard in shards)


def test_iid_is_deterministic_even_and_shuffled() -> None:
    shards = iid(103, 4, seed=7)

    assert _is_partition(shards, 103)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    assert shards == iid(103, 4, seed=7) and shards != iid(103, 4, seed=8)
    assert shards[0] != list(range(26))  # not contiguous


def test_quantity_skew_sizes_are_skewed_but_nonempty() -> None:
    small = quantity_skew(1000, 5, alpha=0.2, seed=0)
    large = quantity_skew(1000, 5, alpha=1000.0, seed=0)

    assert _is_partition(small, 1000) and _is_partition(large, 1000)
    assert max(len(s) for s in small) > 2 * min(len(s) for s in small)
    assert all(abs(len(s) - 200) < 30 for s in large)  # large alpha: near equal
    assert small == quantity_skew(1000, 5, alpha=0.2, seed=0)


def test_dirichlet_label_skew_proportions() -> None:
    labels = ["a"] * 500 + ["b"] * 500 + ["c"] * 500

    skewed = dirichlet_labels(labels, 5, alpha=0.1, seed=3)
    flat = dirichlet_labels(labels, 5, alpha=1e4, seed=3)

    assert _is_partition(skewed, 1500) and _is_partition(flat, 1500)
    # small alpha: each client is dominated by one label; huge alpha: each label spread ~100 per client
    top_share = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in skewed]
    assert np.mean(top_share) > 0.7
    for shard in flat:
        assert all(abs(count - 100) <= 10 for count in Counter(labels[i] for i in shard).values())
    assert skewed == dirichlet_labels(labels, 5, alpha=0.1, seed=3)


def test_by_field_groups_whole_values() -> None:
    families = ["text", "files", "math", "text", "math", "files", "text"]

    shards = by_field(families, 2)

    # sorted groups: files -> 0, math -> 1, text -> 0
    assert shards == [[0, 1, 3, 5, 6], [2, 4]]
    with pytest.raises(ValueError, match="distinct values"):
        by_field(families, 4)


def test_partition_dispatch_and_errors() -> None:
    assert partition("iid", 3, 0, num_items=9) == iid(9, 3, 0)
    assert partition("field", 2, 0, labels=["x", "y", "x"]) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="expected one of"):
        partition("round-robin", 2, 0, num_items=4)
    with pytest.raises(ValueError, match="at least one example per client"):
        iid(2, 3, 0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_labels(["a", "b"], 2, alpha=0.0, seed=0)


def test_dirichlet_labels_redraws_until_every_client_holds_min_size():
    labels = [i % 3 for i in range(60)]

    shards = dirichlet_labels(labels, 3, alpha=0.3, seed=1, min_size=8)

    assert min(len(s) for s in shards) >= 8
    assert sorted(i for s in shards for i in s) == list(range(60))
