"""A server that crashes in the middle of a secagg aggregation resumes from its last checkpoint (issue 9).

The server process is stopped after every masked input of the last round arrived and before any share
was revealed (the unmask request is never sent); a new server restores the previous round's checkpoint
on the same identity, the same client processes reconnect to it, and the run ends with the global parts
of an uninterrupted run: the last round is aggregated exactly once, by the new server. Under
``hybrid_top_fraction`` the new server ranks the tensors as the old one would have (`resume_private`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsplit.config import AggregationConfig
from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint
from fedsplit.server.private_resume import resume_private
from fedsplit.server.private_round import PrivateAggregator

from .private_federation import make_private_federation
from .test_private_round import CLIENTS, SIZES, assert_fedavg, secagg_bound


class ServerCrash(BaseException):
    """The server process dies: nothing after this point runs on it (no checkpoint, no reply)."""


def crash_before_unmasking(aggregator: PrivateAggregator, round: int, on_crash: Any) -> dict[str, Any]:
    """Make ``aggregator`` die when ``round``'s unmask request is about to go out; returns what it saw."""
    seen: dict[str, Any] = {}
    advance = aggregator._advance

    def advance_or_crash(r: Any, phase: str, **outputs: Any) -> None:
        if phase == "unmask" and r.number == round:
            seen["masked"] = sorted(r.box("masked"))
            on_crash()
            raise ServerCrash(f"test: the server dies in round {round} before unmasking")
        advance(r, phase, **outputs)

    aggregator._advance = advance_or_crash  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(("agg", "rounds"), [
    (AggregationConfig(mode="secagg"), 2),
    (AggregationConfig(mode="hybrid", hybrid_top_fraction=0.5), 3),  # round 3 ranks by round 2's global update
], ids=["secagg", "hybrid-top-fraction"])
def test_server_crash_before_unmasking_resumes_from_the_checkpoint_with_the_same_result(tmp_path, agg, rounds):
    # Arrange: an uninterrupted secagg (or ranked hybrid) run
    full = make_private_federation(tmp_path / "full", agg, CLIENTS, batch_sizes=SIZES, num_rounds=rounds)
    uninterrupted = full.run()
    # ... and the same run whose server dies in its last round with every masked input in, nothing
    # unmasked; its successor (same keys, fresh process state) takes over from the last checkpoint
    ckpt = tmp_path / "crash" / "ckpt"
    crashed = make_private_federation(tmp_path / "crash", agg, CLIENTS, batch_sizes=SIZES, num_rounds=rounds,
                                      checkpoint_dir=ckpt)
    successor = make_private_federation(tmp_path / "crash", agg, CLIENTS, batch_sizes=SIZES, num_rounds=rounds,
                                        identities=crashed.identities, privates=crashed.privates,
                                        checkpoint_dir=tmp_path / "crash" / "ckpt-2")

    def die_and_hand_over() -> None:
        crashed.server.stop(0)  # every client's session ends mid-phase
        last = latest_checkpoint(ckpt)
        assert last is not None and last.name == f"round-{rounds - 1:06d}"
        restored = load_checkpoint(last)
        successor.coordinator.restore(restored)
        resume_private(successor.coordinator.strategy, ckpt, restored.round, successor.initial,
                       restored.global_adapters)  # as recipes/network.py does on --resume
        crashed.address = successor.address  # the clients dial the restarted server

    seen = crash_before_unmasking(crashed.coordinator.strategy, rounds, die_and_hand_over)

    # Act: the same client processes run through the crash
    threads = crashed.start_clients()
    try:
        crashed.coordinator.start()
        try:
            crashed.coordinator.wait(60)
        except ServerCrash:
            pass
        result = successor.coordinator.start().wait(60)
    finally:
        for thread in threads:
            thread.join(60)
        for runner in crashed.runners.values():
            runner.close()
        successor.server.stop(0)

    # Assert: the crash came after all masked inputs; the last round was aggregated once, by the successor
    assert seen["masked"] == CLIENTS
    assert crashed.coordinator.completed_round == rounds - 1
    assert sorted(p.name for p in ckpt.iterdir()) == [f"round-{n:06d}" for n in range(1, rounds)]
    assert [(h["round"], h["clients"]) for h in result.history] == [(rounds, CLIENTS)]
    for cid in CLIENTS:
        outcome = crashed.outcomes[cid]
        assert [r.round for r in outcome.rounds] == list(range(1, rounds + 1)), (cid, outcome)
        assert outcome.final_round == rounds
        assert outcome.reconnects >= 1  # its session to the dead server ended mid-phase; it dialled the successor
    # the resumed run ends where the uninterrupted one did (the masks cancel: the same ring sum)
    assert_fedavg(result.global_adapters, {k: v.double() for k, v in uninterrupted.global_adapters.items()},
                  atol=secagg_bound() + 1e-9, rtol=0)
    assert_fedavg(result.global_adapters, full.fedavg(rounds, CLIENTS), atol=secagg_bound() + 1e-9, rtol=2e-7)
    if agg.hybrid_top_fraction:  # the successor encrypted the set the uninterrupted server did (not all)
        expected = full.coordinator.strategy.encrypted_sets[rounds]
        assert expected is not None and successor.coordinator.strategy.encrypted_sets == {rounds: expected}
    for key, value in uninterrupted.trunk_adapters.items():
        assert torch.equal(result.trunk_adapters[key], value), key
