"""Fixtures for the data tests: the shared public data (skipped when absent), the tiny tokenizer,
and a helper that writes small input files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedsplit.data import shared_data_dir
from fedsplit.models.tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$FEDSPLIT_SHARED/data`` (default ``<repo>/../shared/data``); skips the test when absent."""
    directory = shared_data_dir()
    if directory is None:
        pytest.skip("shared data not found: set FEDSPLIT_SHARED to the folder holding data/ (default <repo>/../shared)")
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level ChatML tokenizer of the test models (built in memory)."""
    return build_tiny_tokenizer()


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    """``write(name, content)`` -> the path of a new file in the test's temporary folder."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return _write
