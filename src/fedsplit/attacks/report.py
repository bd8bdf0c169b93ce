"""``privacy_report.json`` and ``privacy.png``: leakage per attack, p and sigma, and the recommendation.

The recommendation is the fine-tuned defence point whose learned inversion (the strongest attacker
run on it) recovers at most ``max_recovery`` of the tokens at a held-out loss cost of at most
``max_quality_cost``, lowest recovery first; if none qualifies, the point with the lowest recovery
among the Pareto frontier of (recovery, quality cost) under the cost bound (else the cheapest), with
``meets_target: false``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_VERSION = 1
REQUIRED = {
    "version": int,
    "model": str,
    "settings": dict,
    "nearest_neighbour": list,
    "learned": list,
    "gradients": list,
    "traffic": dict,
    "defences": list,
    "frontier": list,
    "recommended": dict,
}
POINT_KEYS = ("head_layers", "noise_std", "token_recovery")
DEFENCE_KEYS = (
    "name",
    "head_layers",
    "noise_std",
    "adversarial_weight",
    "heldout_loss",
    "zero_shot_loss",
    "quality_cost",
    "token_recovery",
)


def pareto_frontier(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Points no other point beats on both token recovery and quality cost, by increasing cost."""
    frontier: list[Mapping[str, Any]] = []
    for point in sorted(points, key=lambda d: (d["quality_cost"], d["token_recovery"])):
        if not frontier or point["token_recovery"] < frontier[-1]["token_recovery"]:
            frontier.append(point)
    return frontier


def recommend(defences: Sequence[Mapping[str, Any]], max_recovery: float, max_quality_cost: float) -> dict[str, Any]:
    if not defences:
        raise ValueError("recommend: no defence was measured")
    meets = [d for d in defences if d["token_recovery"] <= max_recovery and d["quality_cost"] <= max_quality_cost]
    if meets:
        best = min(meets, key=lambda d: (d["token_recovery"], d["quality_cost"]))
    else:
        affordable = [d for d in defences if d["quality_cost"] <= max_quality_cost]
        best = (
            min(affordable, key=lambda d: d["token_recovery"])
            if affordable
            else min(defences, key=lambda d: d["quality_cost"])
        )
    return {
        **best,
        "meets_target": bool(meets),
        "target": {"max_recovery": max_recovery, "max_quality_cost": max_quality_cost},
    }


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field that does not follow the schema."""
    for key, kind in REQUIRED.items():
        if not isinstance(report.get(key), kind):
            raise ValueError(f"privacy report: {key}: expected {kind.__name__}, got {type(report.get(key)).__name__}")
    for section in ("nearest_neighbour", "learned"):
        for i, point in enumerate(report[section]):
            for key in POINT_KEYS:
                if key not in point:
                    raise ValueError(f"privacy report: {section}[{i}]: missing {key}")
            if not 0.0 <= point["token_recovery"] <= 1.0:
                raise ValueError(
                    f"privacy report: {section}[{i}].token_recovery: expected 0..1, got {point['token_recovery']}"
                )
    for i, point in enumerate(report["defences"] + [report["recommended"]]):
        for key in DEFENCE_KEYS:
            if key not in point:
                raise ValueError(f"privacy report: defences[{i}]: missing {key}")


def write_report(report: Mapping[str, Any], out: Path) -> Path:
    validate_report(report)
    path = Path(out) / "privacy_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_privacy(report: Mapping[str, Any], path: Path) -> Path:
    """Left: recovery vs head depth p (no noise). Right: recovery vs sigma at the run's p, quality cost beside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    by_p, by_sigma = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    p_run = report["settings"]["run_head_layers"]
    series = {
        "nearest neighbour": report["nearest_neighbour"],
        "learned (ridge)": [{**d, "token_recovery": d["ridge"]} for d in report["learned"]],
    }
    softmax = [{**d, "token_recovery": d["softmax"]} for d in report["learned"] if d.get("softmax") is not None]
    if softmax:
        series["learned (softmax)"] = softmax
    for label, points in series.items():
        style: dict[str, Any] = {"marker": "o", "linestyle": "none" if "softmax" in label else "-"}  # few points
        clean = sorted((d["head_layers"], d["token_recovery"]) for d in points if d["noise_std"] == 0.0)
        by_p.plot([p for p, _ in clean], [100 * r for _, r in clean], label=label, **style)
        noisy = sorted((d["noise_std"], d["token_recovery"]) for d in points if d["head_layers"] == p_run)
        by_sigma.plot([s for s, _ in noisy], [100 * r for _, r in noisy], label=label, **style)
    by_p.set(
        xlabel="head depth p (blocks on the client)",
        ylabel="tokens recovered (%)",
        ylim=(-2, 102),
        title="server's inversion of cut-1 hidden states, no noise",
    )
    by_sigma.set_xscale("symlog", linthresh=0.01)
    by_sigma.set(
        xlabel="noise sigma on sent hidden states",
        ylabel="tokens recovered (%)",
        ylim=(-2, 102),
        title=f"p = {p_run}: recovery vs noise; quality cost of fine-tuned points",
    )
    target = report["recommended"]["target"]["max_recovery"]
    by_sigma.axhline(100 * target, color="grey", linestyle=":", label=f"target {100 * target:g} %")
    cost = by_sigma.twinx()
    tuned = [d for d in report["defences"] if d["head_layers"] == p_run and not d["adversarial_weight"]]
    tuned.sort(key=lambda d: d["noise_std"])
    sigmas = [d["noise_std"] for d in tuned]
    cost.plot(sigmas, [100 * d["quality_cost"] for d in tuned], "k--s", label="held-out loss increase (%)")
    # The loss increase alone hides how much of a short fine-tune's gain is gone.
    gains = [(d["noise_std"], 100 * d["gain_lost"]) for d in tuned if d.get("gain_lost") is not None]
    cost.plot(
        [s for s, _ in gains], [g for _, g in gains], ":", color="purple", marker="d", label="fine-tune gain lost (%)"
    )
    for d in report["defences"]:
        if d["adversarial_weight"]:
            cost.plot(
                [d["noise_std"]], [100 * d["quality_cost"]], "r*", markersize=12, label=f"quality cost, {d['name']}"
            )
            by_sigma.plot([d["noise_std"]], [100 * d["token_recovery"]], "r^", label=f"recovery, {d['name']}")
    cost.set(ylabel="quality cost (%)", ylim=(-2, 102))
    by_p.legend(fontsize=8)
    handles = by_sigma.get_legend_handles_labels()[0] + cost.get_legend_handles_labels()[0]
    by_sigma.legend(handles=handles, fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
