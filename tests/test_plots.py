from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsplit.plots import moving_average, plot_bars, plot_loss_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_loss_curves_write_a_png(tmp_path: Path) -> None:
    # Arrange
    series = {
        "centralized": [(step, 3.0 / (step + 1)) for step in range(20)],
        "split-fed": [(step, 3.2 / (step + 1)) for step in range(0, 20, 2)],
    }
    path = tmp_path / "plots" / "loss.png"

    # Act
    written = plot_loss_curves(series, path, title="Training loss", smoothing=3)

    # Assert
    assert written == path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_non_finite_points_are_dropped_not_fatal(tmp_path: Path) -> None:
    series = {"diverged": [(0.0, 2.0), (1.0, float("nan")), (2.0, float("inf")), (3.0, 1.0)]}

    written = plot_loss_curves(series, tmp_path / "loss.png", title="t")

    assert written.read_bytes().startswith(PNG_MAGIC)


def test_series_without_finite_points_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"series\['bad'\]: expected at least one point"):
        plot_loss_curves({"bad": [(0.0, float("nan"))]}, tmp_path / "loss.png", title="t")
    with pytest.raises(ValueError, match="expected at least one named series"):
        plot_loss_curves({}, tmp_path / "loss.png", title="t")


def test_bars_write_a_png(tmp_path: Path) -> None:
    values = {"local": 0.21, "fedavg": 0.27, "split": 0.26, "split+dp": 0.24, "secagg": 0.26}

    written = plot_bars(values, tmp_path / "rouge.png", title="ROUGE-L by mode", ylabel="F1")

    data = written.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_bars_reject_non_finite_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"values\['a'\]: expected a finite number, got nan"):
        plot_bars({"a": float("nan")}, tmp_path / "b.png", title="t", ylabel="y")


def test_moving_average_is_a_trailing_mean() -> None:
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    assert moving_average([2.0, 4.0, 6.0, 8.0], 3) == [2.0, 3.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="window: expected an int >= 1, got 0"):
        moving_average([1.0], 0)


def test_importing_plots_does_not_import_matplotlib() -> None:
    code = "import sys, fedsplit.plots; print('matplotlib' in sys.modules)"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"
