"""``[aggregation]`` -> the server's strategy (DP-FedAvg, PrivateAggregator) and the frame bound it needs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedsplit.aggregation.dp import DPFedAvg
from fedsplit.config import AggregationConfig, RunConfig
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.identity import generate_identity
from fedsplit.server.private_round import PrivateAggregator, build_private_strategy, private_frame_bound
from fedsplit.strategy import FedAvg
from fedsplit.strategy.build import IncompatibleStrategyError
from fedsplit.strategy.robust import Median

CLIENTS = ["client-0", "client-1", "client-2"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    for cid in CLIENTS:
        run_keygen(directory, cid)
    return directory


def config(**aggregation) -> RunConfig:
    cfg = RunConfig()
    return replace(cfg, security=replace(cfg.security, clients=CLIENTS),
                   aggregation=AggregationConfig(**aggregation))


def test_plain_without_dp_keeps_the_strategy(keys):
    strategy = FedAvg(local_steps=1, lr=0.1)

    assert build_private_strategy(config(), strategy, keys) is strategy


def test_secagg_with_distributed_dp_wraps_dp_fedavg_in_the_private_phases(keys):
    built = build_private_strategy(config(mode="secagg", dp_noise="distributed"), FedAvg(local_steps=1, lr=0.1), keys)

    assert isinstance(built, PrivateAggregator) and isinstance(built.inner, DPFedAvg)
    assert built.uniform and built.inner.expected_clients == 3
    assert set(built.identities) == set(CLIENTS)


def test_central_dp_in_plain_mode_is_dp_fedavg(keys):
    built = build_private_strategy(config(dp_noise="central"), FedAvg(local_steps=1, lr=0.1), keys)

    assert isinstance(built, DPFedAvg) and built.noise == "central"


def test_a_non_linear_strategy_is_refused_under_secagg():
    publics = {cid: generate_identity().public_key() for cid in CLIENTS}

    with pytest.raises(IncompatibleStrategyError, match="non-linear"):
        PrivateAggregator(Median(plan=FedAvg(local_steps=1, lr=0.1)), AggregationConfig(mode="secagg"), publics,
                          run_id="r")


def test_the_sensitivity_ranked_hybrid_encrypts_everything_until_a_global_update_is_measured():
    publics = {cid: generate_identity().public_key() for cid in CLIENTS}
    aggregator = PrivateAggregator(FedAvg(local_steps=1, lr=0.1),
                                   AggregationConfig(mode="hybrid", hybrid_top_fraction=0.5), publics, run_id="r")
    current = {"head/a": torch.zeros(4), "tail/b": torch.zeros(4)}

    plan = aggregator.configure_round(1, CLIENTS)

    assert plan.settings["hybrid_encrypted"] == "*"
    assert aggregator.partition(current) == {"secagg": ["head/a", "tail/b"]}
    assert aggregator.reference(current) == {}


def test_frame_bound_holds_a_real_ckks_upload_and_a_secagg_vector():
    pytest.importorskip("tenseal")
    from fedsplit.aggregation.ckks import CkksKeyHolder

    agg = AggregationConfig(mode="ckks")
    numel = 5000
    identity = generate_identity()
    holder = CkksKeyHolder("a", identity, {"a": identity.public_key()}, agg.ckks_params(), run_id="r", round=0)
    upload = holder.client().encrypt(np.full(numel + 1, 0.01), 1)

    assert private_frame_bound(agg, numel, 3) > upload.nbytes
    assert private_frame_bound(AggregationConfig(mode="secagg"), numel, 3) > (numel + 1) * 6
    assert private_frame_bound(AggregationConfig(), numel, 3) == 0
