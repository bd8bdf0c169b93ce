"""The load benchmark runs end to end at a small client count: every round completes, the server's
threads are bounded by its configured slots."""

from __future__ import annotations

import pytest

import many_clients


@pytest.mark.slow
def test_three_clients_in_one_process_complete_every_round(tmp_path) -> None:
    result = many_clients.main(["--clients", "3", "--rounds", "2", "--timeout", "300", "--out", str(tmp_path)])

    (row,) = result["rows"]
    assert result["all_rounds_completed"], row
    assert row["server_exit"] == 0 and row["clients_exit"] == 0
    assert len(row["round_s_each"]) == 2 and all(t > 0 for t in row["round_s_each"])
    # the gRPC pool: at most 2 N + 4 authenticated streams + 2 x 16 handshake slots, plus the
    # server's own (torch, coordinator, gRPC poller) threads
    assert 0 < row["server_threads_max"] <= 2 * 3 + 4 + 32 + 16
    assert row["server_rss_mb_max"] > 0
