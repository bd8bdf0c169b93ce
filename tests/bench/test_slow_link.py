"""The slow-link experiment (bench/cross_cloud.py --only slow_link, bench/slow_link.py): its --quick mode
runs sync and semi_sync end to end (a server process, four shaped client sessions) and reports finite
numbers; the modes this checkout's config does not know are skipped with the reason."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fedsplit.data import shared_data_dir

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cross_cloud.py"


def _needs_shared() -> None:
    shared = shared_data_dir()
    if shared is None or not (shared / "emotion" / "train.jsonl").is_file() \
            or not (shared / "models" / "stories260k").is_dir():
        pytest.skip("shared data (emotion, models/stories260k) not found: set FEDSPLIT_SHARED to the folder "
                    "holding data/")


@pytest.mark.slow
def test_quick_slow_link_reports_the_time_ratio_and_loss_gap(capsys, monkeypatch, tmp_path) -> None:
    _needs_shared()
    spec = importlib.util.spec_from_file_location("cross_cloud", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cross_cloud", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)

    result = bench.main(["--quick", "--only", "slow_link", "--out", str(tmp_path)])

    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "cross_cloud" and last["sections"] == ["slow_link"]
    details = result["slow_link"]
    assert set(details["modes"]) == {"sync", "semi_sync", "async"}  # --quick: the headline pair and semi_sync
    assert all(not run["error"] for mode in details["modes"].values() for run in mode["runs"])
    for key in ("async_time_ratio", "async_loss_gap_pct"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), (key, result[key])
    for key in ("sync_loss", "sync_wall_s", "target_loss", "semi_sync_deadline_s"):
        assert math.isfinite(details[key]) and details[key] > 0
    slow, fast = details["slow_link"]["step_network_s"]["slow_s"], details["slow_link"]["step_network_s"]["fast_s"]
    assert slow == pytest.approx(10 * fast, rel=1e-3)  # "10x slower": the modelled network time per step
    for name, reason in details["skipped"].items():  # async / trunk_lease: skipped only for an unknown key
        assert name in ("async", "async+pass", "semi_sync+pass") and "the config refuses it" in reason


def test_a_mode_the_config_refuses_is_skipped_with_the_reason(monkeypatch) -> None:
    import slow_link

    base = slow_link.base_overrides(slow_link.slow_link_settings(True), Path("/shared"), 5000, 1)
    unknown = slow_link.Mode("bogus", ("federation.round_mode=bogus",))

    reason = slow_link.mode_config(base, unknown, 1.0)
    semi = slow_link.mode_config(base, slow_link.MODES[1], 2.5)

    assert isinstance(reason, str) and "federation.round_mode" in reason
    assert semi.federation.round_mode == "semi_sync" and semi.federation.round_deadline_s == 2.5
    assert semi.simulate.links["client-3"].latency_ms == 10 * semi.link.latency_ms


def test_time_to_target_is_the_first_aggregation_at_or_below_it() -> None:
    import slow_link

    curve = [(1.0, 3.0), (2.0, 2.5), (3.0, 2.6), (4.0, 2.0)]

    assert slow_link.time_to_target(curve, 2.55) == 2.0
    assert slow_link.time_to_target(curve, 1.0) is None


def test_the_headline_mode_reached_the_sync_loss_in_every_run() -> None:
    # Arrange: sync ends at 1.0 after 10 s; "lucky" reaches it once (at 2 s) and misses once; "steady" twice
    sys.path.insert(0, str(BENCH.parent))
    try:
        from slow_link import RunRecord, slow_link_settings, summarize
    finally:
        sys.path.remove(str(BENCH.parent))
    runs = [RunRecord("sync", k, 2, [(5.0, 1.5), (10.0, 1.0)], [5.0, 5.0], {}) for k in range(2)]
    runs += [RunRecord("lucky", 0, 4, [(2.0, 1.0), (4.0, 1.2)], [], {}),
             RunRecord("lucky", 1, 4, [(2.0, 1.3), (4.0, 1.2)], [], {}),
             RunRecord("steady", 0, 4, [(3.0, 1.1), (6.0, 1.01)], [], {}),
             RunRecord("steady", 1, 4, [(3.0, 1.1), (7.0, 0.99)], [], {})]

    # Act
    summary = summarize(slow_link_settings(quick=True), runs, {}, 1.0, 2.0, {})

    # Assert: the faster "lucky" is not the headline; "steady" is, with its own median ratio and gap
    assert summary["best_mode"] == "steady"
    assert summary["async_time_ratio"] == pytest.approx(0.65)
    assert summary["async_loss_gap_pct"] == pytest.approx(0.0)
    assert summary["modes"]["lucky"]["reached"] == "1/2"


def test_an_unknown_mode_is_refused_before_any_run(tmp_path) -> None:
    import slow_link

    with pytest.raises(ValueError, match=r"slow_link modes: expected names among sync, .*got \['fast'\]"):
        slow_link.run_slow_link(slow_link.slow_link_settings(True), tmp_path, tmp_path, modes=["async", "fast"])
