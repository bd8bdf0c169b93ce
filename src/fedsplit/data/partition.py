"""Partitioners for simulation: split one pool of examples into client silos, deterministically by seed.

Real federations have data that differ by client (FL-GLM, arXiv 2406.14898; cross-cloud, arXiv
2503.12226). To reproduce that from one pooled data set, these functions return, for each client,
the sorted indices of the pool it owns; every index goes to exactly one client. The randomness
comes only from ``numpy.random.default_rng([seed, ...])``, so a seed always gives the same split.

- :func:`iid`: a shuffled pool dealt into near-equal shards.
- :func:`dirichlet_labels`: label skew (Hsu et al., 2019): for each label, the shares of its
  examples across clients are drawn from ``Dirichlet(alpha)``; small ``alpha`` (0.1-0.5) gives each
  client few labels, large ``alpha`` approaches IID.
- :func:`quantity_skew`: client sizes drawn from ``Dirichlet(alpha)``, contents IID.
- :func:`by_field`: one group per distinct value of a field (e.g. the stdlib-docs module family),
  groups dealt to clients in sorted order, ``value i -> client i % num_clients``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "quantity", "field")


def _check(num_items: int, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients: expected an int >= 1, got {num_clients!r}")
    if num_items < num_clients:
        raise ValueError(f"expected at least one example per client: {num_items} examples for {num_clients} clients")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")


def iid(num_items: int, num_clients: int, seed: int) -> list[list[int]]:
    """A random permutation cut into ``num_clients`` shards whose sizes differ by at most one."""
    _check(num_items, num_clients)
    order = np.random.default_rng([seed, 0]).permutation(num_items)
    return [sorted(int(i) for i in shard) for shard in np.array_split(order, num_clients)]


def quantity_skew(num_items: int, num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Shard sizes ``1 + multinomial(num_items - num_clients, Dirichlet(alpha))``; contents shuffled."""
    _check(num_items, num_clients)
    _check_alpha(alpha)
    rng = np.random.default_rng([seed, 1])
    shares = rng.dirichlet([alpha] * num_clients)
    sizes = 1 + rng.multinomial(num_items - num_clients, shares)  # every client gets at least one
    order = rng.permutation(num_items)
    bounds = np.cumsum(sizes)[:-1]
    return [sorted(int(i) for i in shard) for shard in np.split(order, bounds)]


def dirichlet_labels(
    labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int, *, min_size: int = 1, max_tries: int = 100
) -> list[list[int]]:
    """Label skew: per label (in sorted order), its examples split across clients by ``Dirichlet(alpha)``.

    With ``min_size`` 1 a client left empty takes one example from the largest shard, so every
    client has data; a larger ``min_size`` (e.g. a batch) is met by drawing again, up to ``max_tries``.
    """
    _check(len(labels), num_clients)
    _check_alpha(alpha)
    if len(labels) < num_clients * min_size:
        raise ValueError(f"dirichlet_labels: expected at least {num_clients * min_size} items, got {len(labels)}")
    rng = np.random.default_rng([seed, 2])
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(set(labels), key=repr):
            members = rng.permutation([i for i, value in enumerate(labels) if value == label])
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(int(i) for i in part)
        if min_size == 1:
            for client in range(num_clients):  # no empty client: borrow from the largest
                if not shards[client]:
                    donor = max(range(num_clients), key=lambda c: len(shards[c]))
                    shards[client].append(shards[donor].pop())
        if min(len(shard) for shard in shards) >= min_size:
            return [sorted(shard) for shard in shards]
    raise ValueError(f"dirichlet_labels: no draw in {max_tries} gave every client {min_size} items (alpha {alpha})")


def by_field(values: Sequence[Hashable], num_clients: int) -> list[list[int]]:
    """One group per distinct value (sorted); group ``i`` goes to client ``i % num_clients``."""
    _check(len(values), num_clients)
    groups = sorted(set(values), key=repr)
    if len(groups) < num_clients:
        raise ValueError(f"by_field: expected at least {num_clients} distinct values, got {len(groups)} ({groups})")
    owner = {value: i % num_clients for i, value in enumerate(groups)}
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for index, value in enumerate(values):
        shards[owner[value]].append(index)
    return shards


def partition(
    scheme: str,
    num_clients: int,
    seed: int,
    *,
    num_items: int | None = None,
    labels: Sequence[Hashable] | None = None,
    alpha: float = 0.5,
) -> list[list[int]]:
    """Dispatch by name: ``iid``/``quantity`` need ``num_items``, ``dirichlet``/``field`` need ``labels``."""
    if scheme not in PARTITIONS:
        raise ValueError(f"partition: expected one of {', '.join(PARTITIONS)}, got {scheme!r}")
    if scheme in ("dirichlet", "field"):
        if labels is None:
            raise ValueError(f"partition {scheme!r}: expected labels (one value per example), got none")
        if scheme == "field":
            return by_field(labels, num_clients)
        return dirichlet_labels(labels, num_clients, alpha, seed)
    count = num_items if num_items is not None else (len(labels) if labels is not None else None)
    if count is None:
        raise ValueError(f"partition {scheme!r}: expected num_items, got none")
    return iid(count, num_clients, seed) if scheme == "iid" else quantity_skew(count, num_clients, alpha, seed)
