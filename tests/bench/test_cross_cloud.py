"""The cross-cloud benchmark's --quick mode runs end to end (tiny-llama, 1 round) and reports its keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedsplit.data import shared_data_dir

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cross_cloud.py"


@pytest.mark.slow
def test_quick_mode_reports_the_poisoning_and_non_iid_numbers(capsys, monkeypatch) -> None:
    if shared_data_dir() is None or not (shared_data_dir() / "emotion" / "train.jsonl").is_file():
        pytest.skip("shared data (emotion) not found: set FEDSPLIT_SHARED to the folder holding data/")
    spec = importlib.util.spec_from_file_location("cross_cloud", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cross_cloud", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)

    result = bench.main(["--quick", "--only", "poisoning,non_iid"])  # slow_link: tests/bench/test_slow_link.py

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('{"bench": "cross_cloud"')
    for key in ("robust_loss_gap_pct", "fedavg_poisoned_loss_gap_pct"):
        assert key in result
    losses = result["final_loss"]
    expected = {f"{name}/{attack}" for name in ("fedavg", *bench.ROBUST) for attack in bench.ATTACKS}
    expected |= {f"{name}/{split}" for name in bench.NON_IID for split in ("iid", "dirichlet-0.3")}
    assert expected | {"fedavg/clean"} == set(losses)
    assert all(losses[f"{name}/scaled"] is not None for name in bench.ROBUST)  # None would mean diverged
