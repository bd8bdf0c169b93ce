"""Round checkpoints: safetensors + JSON, atomic, complete enough that a resumed run is exact."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import numpy as np
import pytest
import torch

from fedsplit.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fedsplit.server.coordinator import RoundCoordinator

from .federation import make_federation


@pytest.fixture(scope="module")
def trained() -> RoundCoordinator:
    """A coordinator after one round of two steps: the trunk optimizer has moments to save."""
    fed = make_federation(["a"], num_rounds=1, local_steps=2)
    fed.run()
    return fed.coordinator


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _assert_tensors_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_resumed_run_ends_with_the_same_adapters_as_an_uninterrupted_run(tmp_path):
    # Arrange: a 3-round run checkpoints every round; a fresh server and fresh clients resume from round 2
    full = make_federation(["a", "b"], num_rounds=3, local_steps=2, checkpoint_dir=tmp_path / "full")
    uninterrupted = full.run()
    resumed = make_federation(["a", "b"], num_rounds=3, local_steps=2, checkpoint_dir=tmp_path / "resumed")
    resumed.coordinator.restore(load_checkpoint(tmp_path / "full" / "round-000002"))

    # Act
    result = resumed.run()

    # Assert: bit for bit, on the clients' parts and on the server's trunk
    _assert_tensors_equal(result.global_adapters, uninterrupted.global_adapters)
    _assert_tensors_equal(result.trunk_adapters, uninterrupted.trunk_adapters)
    assert [r["round"] for r in result.history] == [3]
    assert [(r.round, r.first_step) for r in resumed.outcomes["a"].rounds] == [(3, 4)]
    assert resumed.coordinator.trunk.steps_taken == full.coordinator.trunk.steps_taken == 12
    after_round_2 = load_checkpoint(tmp_path / "full" / "round-000002")
    assert not torch.equal(after_round_2.trunk.adapters[next(iter(after_round_2.trunk.adapters))],
                           result.trunk_adapters[next(iter(after_round_2.trunk.adapters))])  # round 3 trained


def test_resume_waits_for_the_clients_of_the_checkpointed_round_so_a_late_one_cannot_change_the_run(tmp_path):
    # Arrange: an uninterrupted 3-round run; then a resumed server whose client "a" comes back after
    # the lobby's grace (0.5 s) has passed, as a client does that is still in its reconnect backoff
    ids = ["a", "b", "c"]
    full = make_federation(ids, num_rounds=3, local_steps=2, checkpoint_dir=tmp_path / "full")
    uninterrupted = full.run()
    resumed = make_federation(ids, num_rounds=3, local_steps=2, checkpoint_dir=tmp_path / "resumed")
    resumed.coordinator.restore(load_checkpoint(tmp_path / "full" / "round-000001"))
    runners = resumed.runners

    # Act
    threads = resumed.start_clients([runners["b"], runners["c"]])
    resumed.coordinator.start()
    time.sleep(1.5)
    threads += resumed.start_clients([runners["a"]])
    result = resumed.coordinator.wait(60)
    for thread in threads:
        thread.join(60)

    # Assert: round 2 waited for "a"; the adapters are those of the uninterrupted run, bit for bit
    assert [sorted(r["clients"]) for r in result.history] == [ids, ids]
    _assert_tensors_equal(result.global_adapters, uninterrupted.global_adapters)
    _assert_tensors_equal(result.trunk_adapters, uninterrupted.trunk_adapters)
    assert load_checkpoint(tmp_path / "full" / "round-000001").round_clients == tuple(ids)


def test_checkpoint_round_trip_keeps_every_field(trained, tmp_path):
    # Arrange
    checkpoint = trained.checkpoint()
    expected_draws = _draws()  # what the generators give right after the checkpoint was taken

    # Act
    loaded = load_checkpoint(save_checkpoint(tmp_path, checkpoint))
    restore_rng(loaded.rng)

    # Assert
    assert (loaded.round, loaded.run_id, loaded.config_hash) == (1, "test-run", "0" * 64)
    assert loaded.client_steps == {"a": 2} and loaded.trunk.steps_taken == 2
    _assert_tensors_equal(loaded.global_adapters, checkpoint.global_adapters)
    _assert_tensors_equal(loaded.trunk.adapters, checkpoint.trunk.adapters)
    assert loaded.trunk.optimizer["param_groups"] == checkpoint.trunk.optimizer["param_groups"]
    saved_state, loaded_state = checkpoint.trunk.optimizer["state"], loaded.trunk.optimizer["state"]
    assert saved_state.keys() == loaded_state.keys() and len(saved_state) > 0
    for index, entries in saved_state.items():
        _assert_tensors_equal(loaded_state[index], entries)
    assert _draws() == expected_draws


def test_checkpoint_is_one_directory_of_safetensors_and_json_written_atomically(trained, tmp_path):
    # Arrange
    checkpoint = trained.checkpoint()
    later = dataclasses.replace(checkpoint, round=7)

    # Act
    save_checkpoint(tmp_path, checkpoint)
    save_checkpoint(tmp_path, later)
    rewritten = save_checkpoint(tmp_path, dataclasses.replace(later, client_steps={"a": 99}))

    # Assert: no temporary directories left; a rerun of a round replaces its checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001", "round-000007"]
    assert sorted(p.name for p in rewritten.iterdir()) == ["state.json", "tensors.safetensors"]
    assert json.loads((rewritten / "state.json").read_text())["client_steps"] == {"a": 99}
    assert latest_checkpoint(tmp_path) == rewritten


def test_loading_something_that_is_not_a_checkpoint_says_so(trained, tmp_path):
    # Arrange
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = save_checkpoint(tmp_path / "foreign", trained.checkpoint())
    state = json.loads((foreign / "state.json").read_text())
    (foreign / "state.json").write_text(json.dumps({**state, "version": 99}))

    # Act / Assert
    with pytest.raises(CheckpointError, match="no state.json; expected a checkpoint directory"):
        load_checkpoint(empty)
    expected = "expected format 'fedsplit.checkpoint' version 1, got 'fedsplit.checkpoint' version 99"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(foreign)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_restore_refuses_a_checkpoint_of_another_run(trained):
    # Arrange
    fresh = make_federation(["a"], num_rounds=1, local_steps=2).coordinator
    other: Checkpoint = dataclasses.replace(trained.checkpoint(), run_id="other-run")

    # Act / Assert
    with pytest.raises(
        CheckpointError, match="checkpoint belongs to run 'other-run'.*this coordinator runs 'test-run'"
    ):
        fresh.restore(other)
