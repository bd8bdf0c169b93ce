"""Shared base weights: the trunk's frozen tensors are read-only views of the safetensors file.

Checks the three claims of :mod:`fedsplit.server.shared_weights`: the loaded trunk equals the normally
loaded one bit for bit; its tensors lie in a mapping of the file (not a private copy), also after
LoRA training; two processes that load it share the pages (PSS about half of RSS for the mapping).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_lora
from fedsplit.models import load_model
from fedsplit.server.shared_weights import (
    SharedWeightsError,
    load_shared_trunk,
    mapped_file,
    mapping_memory,
    resolve_weights_dir,
)
from fedsplit.split import split_model

_CHILD = """
import sys, torch
from fedsplit.server.shared_weights import load_shared_trunk
trunk = load_shared_trunk(sys.argv[1], 1, 1)
total = sum(float(t.double().sum()) for t in trunk.state_dict().values())  # touch every page
print("ready", total, flush=True)
sys.stdin.read()  # hold the mapping until the parent has measured
"""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-llama and tiny-qwen2 (q/k/v biases, mixed attention) written as safetensors directories."""
    out = {}
    for name in ("tiny-llama", "tiny-qwen2"):
        out[name] = _save(name, tmp_path_factory.mktemp(name))
    return out


def _save(name: str, directory: Path) -> Path:
    model, tokenizer = load_model(name)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _assert_same_trunk(shared: torch.nn.Module, normal: torch.nn.Module, hidden_size: int) -> None:
    a, b = shared.state_dict(), normal.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for (name, x), (_, y) in zip(
        shared.named_buffers(), normal.named_buffers(), strict=False
    ):  # rotary: rebuilt, not stored
        assert torch.equal(x, y), name
    hidden = torch.randn(2, 7, hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert torch.equal(shared(hidden, mask, positions), normal(hidden, mask, positions))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_shared_trunk_equals_the_normally_loaded_trunk_bit_for_bit(saved_models, name):
    # Arrange: the trunk loaded the usual way from the directory, and the in-memory model that was saved
    directory = saved_models[name]
    normal = split_model(load_model(str(directory))[0], 1, 1).trunk
    original = split_model(load_model(name)[0], 1, 1).trunk

    # Act
    shared = load_shared_trunk(directory, 1, 1)

    # Assert
    _assert_same_trunk(shared, normal, int(normal.config.hidden_size))
    _assert_same_trunk(shared, original, int(normal.config.hidden_size))


def test_smollm2_shared_trunk_equals_the_normally_loaded_trunk_bit_for_bit():
    from transformers import AutoModelForCausalLM

    from fedsplit.models.gguf import smollm2_cache_dir

    if not smollm2_cache_dir().is_dir():
        pytest.skip("the SmolLM2 safetensors cache is not there (load_model('smollm2-135m') once)")
    # what load_model("smollm2-135m") does for the weights, without the tokenizer
    normal = split_model(AutoModelForCausalLM.from_pretrained(smollm2_cache_dir(), dtype=torch.float32), 1, 1).trunk
    shared = load_shared_trunk("smollm2-135m", 1, 1)
    assert (
        mapped_file(next(iter(shared.state_dict().values())))
        == resolve_weights_dir("smollm2-135m") / "model.safetensors"
    )
    _assert_same_trunk(shared, normal, 576)


def test_shared_tensors_are_views_of_the_file_and_lora_training_writes_none_of_them(saved_models):
    # Arrange
    directory = saved_models["tiny-llama"]
    weights = (directory / "model.safetensors").resolve()
    trunk = load_shared_trunk(directory, 1, 1)
    add_lora(trunk, LoraSettings(r=2), seed=1)
    lora = [p for p in trunk.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=0.1)
    hidden = torch.randn(2, 6, 64, requires_grad=True)
    mask, positions = torch.ones(2, 6, dtype=torch.bool), torch.arange(6).expand(2, 6)

    # Act: two LoRA steps through the mapped base weights
    for _ in range(2):
        trunk(hidden, mask, positions).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    # Assert: every frozen tensor is still a view of the file, no page was copied, LoRA is private
    frozen = {k: v for k, v in trunk.state_dict().items() if "lora_" not in k}
    assert frozen and all(mapped_file(t) == weights for t in frozen.values())
    assert all(mapped_file(p) is None for p in lora)
    memory = mapping_memory(os.getpid(), weights)
    assert memory.rss > 0 and memory.copied == 0


def test_two_processes_share_the_pages_of_the_trunk(tmp_path):
    # Arrange: a file only this test maps; this process and a child each load the trunk, touch every weight
    directory = _save("tiny-llama", tmp_path)
    weights = directory / "model.safetensors"
    with open(weights, "rb") as f:
        os.fsync(f.fileno())  # no page under writeback: fault-around maps the same pages in both processes
    trunk = load_shared_trunk(directory, 1, 1)
    total = sum(float(t.double().sum()) for t in trunk.state_dict().values())
    trunk_bytes = sum(t.numel() * t.element_size() for t in trunk.state_dict().values())
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline().split()  # type: ignore[union-attr]
        assert line[0] == "ready" and float(line[1]) == total

        # Act
        memory = [mapping_memory(os.getpid(), weights), mapping_memory(child.pid, weights)]
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(timeout=30)

    # Assert: in each process the trunk's bytes are resident and shared with the other, so PSS charges
    # each process about half of them (fault-around may map a few extra pages of the other tensors)
    for m in memory:
        assert m.shared >= 0.9 * trunk_bytes
        assert m.pss <= m.rss - 0.45 * trunk_bytes
        assert m.copied == 0


def test_refuses_what_cannot_be_shared(saved_models, tmp_path):
    with pytest.raises(SharedWeightsError, match="config.json"):
        load_shared_trunk(tmp_path, 1, 1)
    with pytest.raises(SharedWeightsError, match=r"hold \['torch.float32'\], expected torch.bfloat16"):
        load_shared_trunk(saved_models["tiny-llama"], 1, 1, dtype=torch.bfloat16)
