from __future__ import annotations

import pytest

from fedsplit.config import RunConfig
from fedsplit.configio import ConfigError, load_config
from fedsplit.strategy import (
    AGGREGATION_MODES,
    STRATEGY_NAMES,
    FedAvg,
    FedOpt,
    FedProx,
    IncompatibleStrategyError,
    Krum,
    Strategy,
    StrategyConfig,
    build_strategy,
    check_aggregation_mode,
    is_linear,
)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_name_builds_a_strategy(name: str) -> None:
    strategy = build_strategy(StrategyConfig(name=name), local_steps=2, lr=0.1)

    assert isinstance(strategy, Strategy)
    assert is_linear(strategy) == is_linear(name)


def test_build_passes_the_knobs() -> None:
    prox = build_strategy(StrategyConfig(name="fedprox", mu=0.3, max_share=0.5), local_steps=2, lr=0.1, min_clients=2)
    adam = build_strategy(StrategyConfig(name="fedadagrad", eta=0.5), local_steps=2, lr=0.1)
    krum = build_strategy(StrategyConfig(name="multi-krum", byzantine=2, selected=4), local_steps=2, lr=0.1)

    assert isinstance(prox, FedProx) and prox.mu == 0.3 and prox.plan.max_share == 0.5 and prox.plan.min_clients == 2
    assert isinstance(adam, FedOpt) and adam.kind == "adagrad" and adam.eta == 0.5
    assert isinstance(krum, Krum) and (krum.byzantine, krum.selected) == (2, 4)
    assert isinstance(build_strategy(StrategyConfig(), local_steps=1, lr=0.1), FedAvg)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregation_mode_check(mode: str) -> None:
    median = build_strategy(StrategyConfig(name="median"), local_steps=1, lr=0.1)
    check_aggregation_mode("fedadam", mode)  # linear rules run everywhere
    check_aggregation_mode(build_strategy(StrategyConfig(name="dynamic"), local_steps=1, lr=0.1), mode)
    if mode == "plain":
        check_aggregation_mode(median, mode)
    else:
        with pytest.raises(IncompatibleStrategyError, match=f"'median' is non-linear.*'{mode}'"):
            check_aggregation_mode(median, mode)


def test_aggregation_mode_check_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="aggregation mode"):
        check_aggregation_mode("fedavg", "tee")
    with pytest.raises(ValueError, match="expected one of"):
        check_aggregation_mode("fedbogus", "secagg")


def test_strategy_section_in_toml(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[strategy]\nname = "trimmed-mean"\ntrim_beta = 0.2\n')

    cfg = load_config(RunConfig, path)

    assert cfg.strategy.name == "trimmed-mean" and cfg.strategy.trim_beta == 0.2
    with pytest.raises(ConfigError, match="strategy.name"):
        load_config(RunConfig, path, ["strategy.name=fedbogus"])
    with pytest.raises(ConfigError, match="max_share"):
        load_config(RunConfig, path, ["strategy.max_share=0"])
