"""Shared fixtures: tiny random-weight models of every architecture in the split table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fedsplit.models import TINY_MODELS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    from fedsplit.models import load_model

    return {name: load_model(name) for name in TINY_MODELS}


@pytest.fixture
def tiny_llama():
    from fedsplit.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = Path(os.environ.get("FEDSPLIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set FEDSPLIT_SHARED)")
    return root
