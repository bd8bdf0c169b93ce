"""Checkpoints that detect corruption, clean up after crashes and keep only the last K (issue 7, item 8)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedsplit.server.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fedsplit.server.coordinator import RoundCoordinator

from .federation import make_federation


@pytest.fixture(scope="module")
def trained() -> RoundCoordinator:
    fed = make_federation(["a"], num_rounds=1, local_steps=2)
    fed.run()
    return fed.coordinator


def _flip_a_tensor_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01  # inside the last tensor's data, past the safetensors header
    path.write_bytes(bytes(blob))


def test_a_bit_flip_inside_the_tensors_is_refused_with_the_file_name(tmp_path, trained):
    path = save_checkpoint(tmp_path, trained.checkpoint())
    _flip_a_tensor_byte(path / "tensors.safetensors")

    with pytest.raises(CheckpointError, match=r"tensors.safetensors: SHA-256 does not match state.json"):
        load_checkpoint(path)


def test_a_truncated_tensors_file_is_refused_with_the_file_name(tmp_path, trained):
    path = save_checkpoint(tmp_path, trained.checkpoint())
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=r"round-000001/tensors.safetensors: SHA-256 does not match"):
        load_checkpoint(path)


def test_a_truncated_state_file_is_refused_with_the_file_name(tmp_path, trained):
    path = save_checkpoint(tmp_path, trained.checkpoint())
    text = (path / "state.json").read_text()
    (path / "state.json").write_text(text[: len(text) // 2])

    with pytest.raises(CheckpointError, match=r"round-000001/state.json: not valid JSON .*truncated or corrupted"):
        load_checkpoint(path)


def test_an_edited_state_file_is_refused(tmp_path, trained):
    path = save_checkpoint(tmp_path, trained.checkpoint())
    state = json.loads((path / "state.json").read_text())
    state["trunk_steps_taken"] += 1
    (path / "state.json").write_text(json.dumps(state))

    with pytest.raises(CheckpointError, match=r"state.json: SHA-256 of its content does not match"):
        load_checkpoint(path)


def test_a_non_finite_state_is_never_written(tmp_path, trained):
    checkpoint = trained.checkpoint()
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in checkpoint.global_adapters.items()}

    with pytest.raises(CheckpointError, match="holds NaN or Inf; a poisoned state is never checkpointed"):
        save_checkpoint(tmp_path, dataclasses.replace(checkpoint, global_adapters=poisoned))
    assert list(tmp_path.iterdir()) == []


def test_only_the_last_k_checkpoints_are_kept_and_crash_leftovers_are_removed(tmp_path, trained):
    checkpoint = trained.checkpoint()
    (tmp_path / ".round-000003.abandoned").mkdir()  # what a SIGKILL during a save leaves

    for number in range(1, 7):
        save_checkpoint(tmp_path, dataclasses.replace(checkpoint, round=number), keep_last=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000005", "round-000006"]
    assert latest_checkpoint(tmp_path).name == "round-000006"
    assert load_checkpoint(tmp_path / "round-000006").round == 6
