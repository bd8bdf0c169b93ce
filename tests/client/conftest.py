"""Fixtures for the client runner: a tiny split model with LoRA, token batches, a fake server."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.split import SplitParts, split_model

LORA = [LoraSettings(r=2), LoraSettings(r=2), LoraSettings(r=2)]


def build_model() -> tuple[torch.nn.Module, SplitParts]:
    """A fresh tiny Llama cut 1 | 4 | 1 with LoRA on every part (the parts share the model's modules)."""
    from fedsplit.models import load_model

    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, LORA, seed=0)
    return model, parts


def token_batches(count: int, batch_size: int, seed: int, length: int = 12) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 250, (batch_size, length), generator=g)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[0, length - 3 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


@pytest.fixture
def model_and_parts() -> tuple[torch.nn.Module, SplitParts]:
    return build_model()
