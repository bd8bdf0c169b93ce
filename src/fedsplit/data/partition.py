"""Splitting one data set into client silos: IID, or label-skewed by a Dirichlet prior.

FL-GLM (arXiv 2406.14898) evaluates federated split training on data spread over clients; the
usual non-IID benchmark protocol (Hsu et al. 2019, arXiv 1909.06335) draws each class's share of
every client from ``Dirichlet(alpha)``: alpha -> 0 gives each client few classes, alpha -> inf IID.
Both functions return index lists (one per client) and depend only on their arguments.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def iid_partition(num_items: int, num_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle dealt round-robin: sizes differ by at most one."""
    if num_clients < 1 or num_items < num_clients:
        raise ValueError(f"iid_partition: expected 1 <= num_clients <= num_items, got {num_clients} and {num_items}")
    order = np.random.default_rng(seed).permutation(num_items).tolist()
    return [sorted(order[k::num_clients]) for k in range(num_clients)]


def dirichlet_partition(
    labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int, *, min_size: int = 1, max_tries: int = 100
) -> list[list[int]]:
    """Label skew: class ``c``'s items are dealt to clients in proportions drawn from ``Dirichlet(alpha)``.

    Draws again (up to ``max_tries``) until every client holds at least ``min_size`` items.
    """
    if not alpha > 0:
        raise ValueError(f"dirichlet_partition: expected alpha > 0, got {alpha}")
    if num_clients < 1 or len(labels) < num_clients * min_size:
        raise ValueError(f"dirichlet_partition: expected at least {num_clients * min_size} items, got {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels), key=str)
    by_class = {c: rng.permutation([i for i, label in enumerate(labels) if label == c]) for c in classes}
    for _ in range(max_tries):
        silos: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            items = by_class[c]
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(items)).astype(int)
            for k, part in enumerate(np.split(items, cuts)):
                silos[k] += part.tolist()
        if min(len(s) for s in silos) >= min_size:
            return [sorted(s) for s in silos]
    raise ValueError(f"dirichlet_partition: no draw in {max_tries} gave every client {min_size} items (alpha {alpha})")
