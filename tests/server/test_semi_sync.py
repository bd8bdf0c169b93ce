"""Semi-synchronous rounds: at the round's deadline the coordinator aggregates the updates that arrived;
a participant behind a slow link fails the round ("round timeout") instead of stalling it."""

from __future__ import annotations

import time
from dataclasses import replace

from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.protocol import pb
from fedsplit.recipes.round_mode import RoundTiming, round_timing

from .federation import make_federation


class SlowBeforeForward:
    """A transport that waits ``delay_s`` before every FORWARD leaves (a slow cloud's link)."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def exchange(self, frame: bytes) -> bytes:
        if pb.Frame.FromString(frame).kind == pb.FORWARD:
            time.sleep(self.delay_s)
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


def test_a_semi_sync_round_aggregates_what_arrived_by_its_deadline(tmp_path):
    # Arrange: [federation] round_mode = "semi_sync", deadline 5 s; "a" needs >= 2 x 3 s for its 2 steps
    cfg = RunConfig()
    cfg = replace(cfg, federation=replace(cfg.federation, round_mode="semi_sync", round_deadline_s=5.0))
    timing = round_timing(cfg)
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b", "c"], num_rounds=1, local_steps=2, min_clients=2, metrics=metrics,
                          round_timeout_s=timing.round_timeout_s, ordered_steps=timing.ordered_steps)
    fast_connect = fed.connector("a")

    def slow_connect():
        channel = fast_connect()
        channel.transport = SlowBeforeForward(channel.transport, 3.0)
        return channel

    fed.runners["a"].connect = slow_connect

    # Act
    with metrics:
        result = fed.run()

    # Assert: b and c aggregated; a failed at the deadline and lost the round
    assert result.history[0]["clients"] == ["b", "c"] and result.history[0]["failures"] == ["a"]
    [failure] = read_metrics(tmp_path / "metrics.jsonl", "client_failed")
    assert failure["reason"] == "round timeout after 5.0 s"
    assert fed.outcomes["a"].lost_rounds == 1 and fed.outcomes["b"].rounds[0].round == 1


def test_round_timing_by_mode():
    cfg = RunConfig()
    semi = replace(cfg, federation=replace(cfg.federation, round_mode="semi_sync", round_deadline_s=30.0))
    batched = replace(cfg, server=replace(cfg.server, mode="client-batch"))
    no_deadline = replace(semi, federation=replace(semi.federation, round_deadline_s=0.0))

    assert round_timing(cfg) == RoundTiming(cfg.server.round_timeout_s, ordered_steps=True)
    assert round_timing(batched).ordered_steps is False
    assert round_timing(semi) == RoundTiming(30.0, ordered_steps=False)
    assert round_timing(no_deadline).round_timeout_s == cfg.server.round_timeout_s
