"""Which sub-server serves which client, in server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3).

At start the clients are spread round-robin (sorted ids over the sorted live ranks), so the
assignment is deterministic. When a sub-server dies, its clients move one by one (sorted ids) to
the live sub-server with the fewest clients (lowest rank on a tie). Plain bookkeeping, no locking:
the router calls it with its lock held.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class ReplicaStatus(enum.Enum):
    LIVE = "live"
    DEAD = "dead"


@dataclass
class Replica:
    rank: int
    address: str
    pid: int
    status: ReplicaStatus = ReplicaStatus.LIVE
    clients: set[str] = field(default_factory=set)
    steps_since: int = 0  # optimizer steps relayed to it since the last sync


@dataclass(frozen=True)
class ReplicaFailure:
    rank: int
    reason: str
    moved: dict[str, int]  # client -> its new sub-server


class Assignment:
    """The replicas by rank and each client's replica."""

    def __init__(self) -> None:
        self.replicas: dict[int, Replica] = {}
        self.clients: dict[str, int] = {}  # client id -> rank

    def add(self, replica: Replica) -> None:
        self.replicas[replica.rank] = replica

    def spread(self, clients: Sequence[str]) -> None:
        """Round-robin: the i-th client (sorted) goes to the (i mod L)-th live rank (sorted)."""
        live = self.live()
        for index, client in enumerate(sorted(clients)):
            self.assign(client, live[index % len(live)])

    def live(self) -> list[int]:
        return sorted(r for r, rep in self.replicas.items() if rep.status is ReplicaStatus.LIVE)

    def least_loaded(self) -> int:
        return min(self.live(), key=lambda r: (len(self.replicas[r].clients), r))

    def assign(self, client_id: str, rank: int) -> int:
        old = self.clients.get(client_id)
        if old is not None:
            self.replicas[old].clients.discard(client_id)
        self.clients[client_id] = rank
        self.replicas[rank].clients.add(client_id)
        return rank

    def retire(self, rank: int) -> dict[str, int]:
        """Mark ``rank`` dead and move its clients to the survivors (if any); returns who moved where."""
        replica = self.replicas[rank]
        replica.status = ReplicaStatus.DEAD
        moved: dict[str, int] = {}
        for client in sorted(replica.clients):
            if self.live():
                moved[client] = self.assign(client, self.least_loaded())
        replica.clients.clear()
        return moved
