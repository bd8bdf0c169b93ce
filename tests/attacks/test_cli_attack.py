"""``fedsplit attack --quick`` end to end on tiny-llama: the report, the plot, the metrics."""

from __future__ import annotations

import json

from fedsplit.attacks.report import validate_report
from fedsplit.cli import main


def test_attack_quick_writes_a_valid_report(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("FEDSPLIT_SHARED", str(shared_data.parent))

    code = main(["attack", "--quick", "--out", str(tmp_path), "--set", "data.max_eval_examples=8"])

    report = json.loads((tmp_path / "privacy_report.json").read_text())
    validate_report(report)
    assert code == 0
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    events = {json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert {"attack_nearest", "attack_learned", "attack_gradients", "attack_traffic", "defence"} <= events
    clean = {(d["head_layers"], d["noise_std"]): d["token_recovery"] for d in report["nearest_neighbour"]}
    assert clean[(0, 0.0)] > 0.99 and clean[(0, 64.0)] < 0.05
    assert report["traffic"]["eavesdropper"]["nearest_neighbour_tokens"] <= 2  # chance: 1 / 260 per token
    assert not report["traffic"]["eavesdropper"]["above_guessing"]
    assert report["traffic"]["readable_with_global_head"]["token_recovery"] > 0.95
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recommended"] == report["recommended"]["name"]


def test_auto_sigmas_pick_the_first_sigma_meeting_the_target_and_the_one_below():
    from fedsplit.recipes.attack import auto_sigmas

    sweep = [{"head_layers": 1, "noise_std": s, "token_recovery": r} for s, r in [(0.0, 0.9), (4.0, 0.5), (8.0, 0.1)]]
    sweep.append({"head_layers": 2, "noise_std": 4.0, "token_recovery": 0.0})

    assert auto_sigmas(sweep, 1, 0.2) == (8.0, 4.0)
    assert auto_sigmas(sweep, 1, 0.01) == (8.0, 4.0)  # none meets: the largest swept sigma
