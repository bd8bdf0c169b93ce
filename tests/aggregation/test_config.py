"""The [aggregation] config section: validation and the builders for each mode."""

from __future__ import annotations

import pytest

from fedsplit.config import AggregationConfig, RunConfig


def test_defaults_are_plain_and_build_valid_parameters() -> None:
    cfg = RunConfig().aggregation
    assert cfg.mode == "plain"
    assert cfg.secagg_params(10).threshold == 6
    assert cfg.ckks_params().slots == 4096
    names = ["head/x.layers.0.a", "tail/x.layers.3.a", "tail/x.layers.4.a"]
    assert cfg.hybrid_policy(names).partition(names) == {"secagg": ["head/x.layers.0.a", "tail/x.layers.4.a"],
                                                         "plain": ["tail/x.layers.3.a"]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fhe"}, "aggregation.mode: expected one of plain, secagg, ckks, hybrid, got 'fhe'"),
        ({"ring_bits": 80}, "ring_bits: expected 16..64"),
        ({"neighbours": 3}, "neighbours: expected an even int"),
        ({"ckks_poly_degree": 1000}, "ckks_poly_degree"),
        ({"mode": "secagg", "dp_noise": "central"}, "central noise needs the server to see updates"),
        ({"dp_delta": 1.5}, "0 < dp_delta < 1"),
        ({"hybrid_top_fraction": 2.0}, "hybrid_top_fraction"),
    ],
)
def test_bad_values_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregationConfig(**kwargs)
