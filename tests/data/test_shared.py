"""Tests for fedsplit.data.shared: the shared data locator follows FEDSPLIT_SHARED."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsplit.data import shared_data_dir


def test_locator_uses_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("FEDSPLIT_SHARED", str(tmp_path))

    assert shared_data_dir() == tmp_path / "data"


def test_locator_returns_none_when_the_folder_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSPLIT_SHARED", str(tmp_path / "nowhere"))

    assert shared_data_dir() is None
