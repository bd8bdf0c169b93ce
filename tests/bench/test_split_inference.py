"""The split-inference benchmark's --quick mode runs end to end over loopback gRPC and reports its keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "split_inference.py"


def test_quick_mode_reports_speedups_and_bytes_and_both_modes_agree(capsys, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("split_inference", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "split_inference", bench)
    spec.loader.exec_module(bench)

    result = bench.main(["--quick"])

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('{"bench": "split_inference"')
    assert result["tokens_match"] is True
    assert {"speedup_8", "speedup_16", "speedup_40", "bytes_per_token"} <= set(result)
    # after the prefill one position crosses each cut per token, the baseline sends the whole prefix
    assert result["bytes_per_token"] * 10 < result["rerun_bytes_per_token"]


def test_the_interpolated_baseline_sums_measured_and_in_between_steps() -> None:
    spec = importlib.util.spec_from_file_location("split_inference_sum", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench._interpolated_sum({0: 1.0, 4: 5.0, 5: 9.0}, 6) == 1 + 2 + 3 + 4 + 5 + 9
