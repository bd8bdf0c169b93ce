"""The batching-ceiling benchmark runs end to end on a tiny model and reports a positive ratio."""

from __future__ import annotations

import sys

import batching_ceiling


def test_tiny_model_reports_the_ratio_of_one_by_one_over_batched(monkeypatch, capsys) -> None:
    argv = ["batching_ceiling.py", "--model", "tiny-llama", "--steps", "2", "--warmup", "0", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)

    result = batching_ceiling.main()

    assert result["ceiling"] > 0 and result["repeats"] == 2
    assert result["ratio_spread"]["min"] <= result["ceiling"] <= result["ratio_spread"]["max"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"bench": "batching_ceiling"')
