from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_quality_run_writes_table_json_plot_and_the_gap_line(shared_data, tmp_path, capsys) -> None:
    out = tmp_path / "quality"

    summary = _bench().main(["--quick", "--out", str(out), "--shared", str(shared_data), "--threads", "1",
                             "--no-progress", "--rounds", "1", "--local-steps", "1", "--max-eval", "4",
                             "--samsum-test", "4",
                             "--max-new-tokens", "4"])

    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary
    for key in ("mean_accuracy_gap_points", "rouge_l_gap", "mean_accuracy_gap_points_dirichlet",
                "mean_accuracy_over_local_points"):
        assert isinstance(last[key], float)
    record = json.loads((out / "quality.json").read_text())
    rows = record["results"]["cb"]["rows"]
    assert set(rows) == {"zero-shot", "local-only (iid)", "federated split (iid)", "local-only (dirichlet)",
                         "federated split (dirichlet)", "centralized"}
    gap = 100 * (rows["centralized"]["accuracy"] - rows["federated split (iid)"]["accuracy"])
    assert last["mean_accuracy_gap_points"] == pytest.approx(gap)
    assert "| cb | centralized |" in (out / "quality.md").read_text()
    assert (out / "quality.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_keeps_the_measured_tasks_and_refuses_other_settings(shared_data, tmp_path, capsys) -> None:
    out = tmp_path / "quality"
    flags = ["--quick", "--out", str(out), "--shared", str(shared_data), "--threads", "1", "--no-progress",
             "--rounds", "1", "--local-steps", "1", "--max-eval", "4", "--samsum-test", "4", "--max-new-tokens", "4",
             "--local-only", "false", "--exact-match", "false"]
    first = _bench().main([*flags, "--tasks", "cb"])
    earlier = json.loads((out / "quality.json").read_text())
    measured = earlier["results"]["cb"]

    second = _bench().main([*flags, "--tasks", "cb,samsum", "--resume"])

    record = json.loads((out / "quality.json").read_text())
    assert record["results"]["cb"] == measured and set(record["results"]) == {"cb", "samsum"}
    assert second["mean_accuracy_gap_points"] == first["mean_accuracy_gap_points"]
    assert isinstance(second["rouge_l_gap"], float)
    assert second["minutes"] > earlier["summary"]["minutes"]  # the kept run's minutes, plus this one's
    assert "cb: kept from" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings: rounds = 1 there, 2 now"):
        _bench().main([*flags, "--tasks", "cb", "--resume", "--rounds", "2"])
