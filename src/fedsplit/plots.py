"""PNG plots for experiment reports: loss curves per mode and bar charts comparing modes.

matplotlib is imported inside the plotting functions and drawn on an Agg canvas of a bare
``Figure``, so importing this module costs nothing and no global pyplot state or backend is
touched (safe in servers and threads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` values (fewer at the start); ``window=1``: identity."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def plot_loss_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: Path | str,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    *,
    smoothing: int = 1,
) -> Path:
    """One line per named series of ``(x, y)`` points, with a legend; returns the PNG's path.

    Points with a non-finite ``y`` (a diverged loss) are dropped. With ``smoothing > 1`` each line
    is a trailing moving average over that many points, drawn over the faint raw curve.
    """
    if not series:
        raise ValueError("series: expected at least one named series, got none")
    figure, axes = _figure()
    for name, points in series.items():
        xs, ys = _finite_points(name, points)
        line = axes.plot(xs, moving_average(ys, smoothing), label=name)[0]
        if smoothing > 1:
            axes.plot(xs, ys, color=line.get_color(), alpha=0.25, linewidth=0.8)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_bars(values: Mapping[str, float], path: Path | str, title: str, ylabel: str) -> Path:
    """One labelled bar per name (e.g. final loss or ROUGE-L per mode); returns the PNG's path."""
    if not values:
        raise ValueError("values: expected at least one named value, got none")
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"values[{name!r}]: expected a finite number, got {value}")
    figure, axes = _figure()
    colors = [f"C{i}" for i in range(len(values))]  # one colour per mode, as in the loss plots
    bars = axes.bar(list(values), list(values.values()), color=colors)
    axes.bar_label(bars, fmt="%.4g")
    axes.set(title=title, ylabel=ylabel)
    axes.grid(axis="y", alpha=0.3)
    if len(values) > 4:  # long mode names overlap otherwise
        axes.tick_params(axis="x", labelrotation=30)
    return _save(figure, path)


def _finite_points(
    name: str, points: Sequence[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    kept = sorted((float(x), float(y)) for x, y in points if math.isfinite(y))
    if not kept:
        raise ValueError(f"series[{name!r}]: expected at least one point with a finite y, got none")
    return [x for x, _ in kept], [y for _, y in kept]


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
