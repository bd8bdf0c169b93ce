"""``[federation] round_mode = "async"``: its config keys, what it refuses to run, and the driver it builds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedsplit.config import AggregationConfig, FederationConfig, RunConfig, ServerConfig
from fedsplit.configio import load_config
from fedsplit.recipes.round_mode import RoundTiming, check_async, make_coordinator, round_timing
from fedsplit.strategy import StrategyConfig


def async_config(**federation) -> RunConfig:
    cfg = RunConfig()
    return replace(cfg, federation=replace(cfg.federation, round_mode="async", **federation))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"round_mode": "fedbuff"}, "expected sync, semi_sync or async, got 'fedbuff'"),
    ({"buffer_size": 1}, "federation.buffer_size: expected an int >= 2, got 1"),
    ({"max_staleness": -1}, "federation.max_staleness: expected an int >= 0, got -1"),
    ({"staleness_exponent": -0.5}, "federation.staleness_exponent: expected a finite value >= 0"),
    ({"server_lr": 0.0}, "federation.server_lr: expected a finite value > 0"),
])
def test_bad_async_keys_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederationConfig(**kwargs)


def test_the_async_keys_load_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nround_mode = "async"\nbuffer_size = 3\nstaleness_exponent = 1.0\n'
                    'max_staleness = 4\nserver_lr = 0.5\n')

    fed = load_config(RunConfig, path).federation

    assert (fed.round_mode, fed.buffer_size, fed.staleness_exponent, fed.max_staleness, fed.server_lr) == (
        "async", 3, 1.0, 4, 0.5)


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: replace(c, strategy=StrategyConfig(name="median")), "strategy.name = 'median'"),
    (lambda c: replace(c, strategy=StrategyConfig(name="fedadam")), "strategy.name = 'fedadam'"),
    (lambda c: replace(c, aggregation=AggregationConfig(mode="secagg")), "aggregation.mode = 'secagg'"),
    (lambda c: replace(c, aggregation=AggregationConfig(dp_noise="central")), "dp_noise = 'central'"),
    (lambda c: replace(c, server=ServerConfig(mode="client-batch")), "server.mode = 'client-batch'"),
    (lambda c: replace(c, federation=replace(c.federation, fraction=0.5)), "federation.fraction = 0.5"),
    (lambda c: replace(c, federation=replace(c.federation, buffer_size=4)), r"buffer_size = 4: expected 2..3"),
    (lambda c: replace(c, federation=replace(c.federation, min_clients=3)), "min_clients = 3"),
])
def test_async_refuses_what_it_cannot_run(change, match):
    cfg = change(async_config())

    with pytest.raises(ValueError, match="round_mode = 'async' cannot run this configuration: .*" + match):
        check_async(cfg, num_clients=3)
    with pytest.raises(ValueError, match=match):  # the driver's builder checks it too
        make_coordinator(cfg, None, None, {}, ["a", "b", "c"], None)


def test_async_accepts_fedavg_fedprox_and_dynamic_and_sync_is_unchecked():
    for name in ("fedavg", "fedprox", "dynamic"):
        check_async(replace(async_config(buffer_size=3), strategy=StrategyConfig(name=name)), num_clients=3)
    check_async(replace(RunConfig(), strategy=StrategyConfig(name="median")), num_clients=1)


def test_async_timing_has_no_turns_and_the_server_round_timeout():
    cfg = async_config(round_deadline_s=5.0)

    assert round_timing(cfg) == RoundTiming(cfg.server.round_timeout_s, ordered_steps=False)
