"""Fixtures for the client runner: a tiny split model with LoRA, token batches, a fake server."""

from __future__ import annotations

import pytest
import torch

from fedsplit.split import SplitParts

from tiny import build_model


@pytest.fixture
def model_and_parts() -> tuple[torch.nn.Module, SplitParts]:
    return build_model()
