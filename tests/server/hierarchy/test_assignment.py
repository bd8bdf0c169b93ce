"""Which sub-server serves which client (fedsplit.server.hierarchy.assignment): pure bookkeeping."""

from __future__ import annotations

from fedsplit.server.hierarchy.assignment import Assignment, Replica, ReplicaStatus


def three_replicas(dead: tuple[int, ...] = ()) -> Assignment:
    assignment = Assignment()
    for rank in (1, 2, 3):
        assignment.add(Replica(rank, f"127.0.0.1:{5000 + rank}", 100 + rank,
                               ReplicaStatus.DEAD if rank in dead else ReplicaStatus.LIVE))
    return assignment


def test_spread_is_round_robin_over_sorted_clients_and_live_ranks():
    # Arrange
    assignment = three_replicas(dead=(2,))

    # Act
    assignment.spread(["e", "b", "a", "d", "c"])

    # Assert
    assert assignment.clients == {"a": 1, "b": 3, "c": 1, "d": 3, "e": 1}
    assert assignment.replicas[1].clients == {"a", "c", "e"} and assignment.replicas[2].clients == set()


def test_a_retired_replicas_clients_go_to_the_least_loaded_survivor_lowest_rank_first():
    # Arrange: 1 serves a, d; 2 serves b, e; 3 serves c
    assignment = three_replicas()
    assignment.spread(["a", "b", "c", "d", "e"])

    # Act
    moved = assignment.retire(2)

    # Assert: b goes to 3 (one client), then e to 1 (tie at two, lower rank)
    assert moved == {"b": 3, "e": 1}
    assert assignment.live() == [1, 3] and assignment.replicas[2].status is ReplicaStatus.DEAD
    assert assignment.replicas[2].clients == set()
    assert assignment.clients == {"a": 1, "b": 3, "c": 3, "d": 1, "e": 1}


def test_retiring_the_last_live_replica_moves_nobody():
    # Arrange
    assignment = three_replicas(dead=(2, 3))
    assignment.spread(["a", "b"])

    # Act
    moved = assignment.retire(1)

    # Assert
    assert moved == {} and assignment.live() == []
