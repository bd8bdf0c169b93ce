"""FedBuff's buffered aggregation (server/buffered.py) against hand-computed values, with tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.server.buffered import (
    AsyncSettings,
    BufferEntry,
    UpdateBuffer,
    VersionStore,
    fedavg_plan,
    fedbuff_step,
    stale_reason,
    staleness_discount,
)
from fedsplit.strategy import AggregationError, FedAvg, FedOpt, FedProx, Median, weighted_average


def entry(client_id: str, weight: float, delta: list[float], count: int = 1) -> BufferEntry:
    return BufferEntry(client_id, weight, {"w": torch.tensor(delta, dtype=torch.float64)}, count)


@pytest.mark.parametrize(("tau", "exponent", "expected"), [(0, 0.5, 1.0), (3, 0.5, 0.5), (1, 1.0, 0.5),
                                                           (8, 0.5, 1 / 3), (5, 0.0, 1.0)])
def test_the_staleness_discount_is_one_over_one_plus_tau_to_the_exponent(tau, exponent, expected):
    assert staleness_discount(tau, exponent) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("tau", [-1, 1.5, True])
def test_a_staleness_that_is_not_a_count_is_refused(tau):
    with pytest.raises(ValueError, match="staleness: expected an int >= 0"):
        staleness_discount(tau, 0.5)


def test_the_step_adds_the_share_weighted_discounted_deltas():
    # Arrange: g = [1, 2]; a (weight 1) moved [2, 0] fresh; b (weight 3) moved [0, 4] three rounds ago: s = 1/2
    current = {"w": torch.tensor([1.0, 2.0])}
    entries = [entry("b", 3.0, [0.0, 4.0 * 0.5]), entry("a", 1.0, [2.0, 0.0])]

    # Act
    new, shares = fedbuff_step(current, entries, server_lr=1.0, max_share=1.0)
    faster, _ = fedbuff_step(current, entries, server_lr=2.0, max_share=1.0)

    # Assert: shares 1/4, 3/4; g + 1/4 [2, 0] + 3/4 [0, 2] = [1.5, 3.5]; server_lr 2 doubles the step
    assert shares == {"a": 0.25, "b": 0.75}
    assert torch.equal(new["w"], torch.tensor([1.5, 3.5])) and new["w"].dtype == torch.float32
    assert torch.equal(faster["w"], torch.tensor([2.0, 5.0]))


def test_max_share_caps_a_heavy_client_within_a_buffer():
    # weights 1 and 9 at max_share 0.6: shares 0.4 and 0.6 instead of 0.1 and 0.9
    current = {"w": torch.zeros(1)}
    new, shares = fedbuff_step(current, [entry("a", 1.0, [10.0]), entry("big", 9.0, [0.0])], server_lr=1.0,
                               max_share=0.6)

    assert shares == pytest.approx({"a": 0.4, "big": 0.6})
    assert new["w"].item() == pytest.approx(4.0)


def test_a_client_that_sent_twice_is_one_entry_with_the_mean_of_its_discounted_deltas():
    # Arrange: buffer of 2 clients; a sends twice (fresh, then 3 rounds stale), b once
    buffer = UpdateBuffer(AsyncSettings(buffer_size=2, staleness_exponent=0.5))
    base = {"w": torch.tensor([1.0])}

    # Act
    first = buffer.add("a", {"w": torch.tensor([3.0])}, base, staleness=0, weight=5, num_examples=5, metrics={})
    second = buffer.add("a", {"w": torch.tensor([5.0])}, base, staleness=3, weight=5, num_examples=5, metrics={})
    ready_alone = buffer.ready()
    buffer.add("b", {"w": torch.tensor([1.0])}, base, staleness=0, weight=5, num_examples=5, metrics={})
    entries = buffer.drain()

    # Assert: a's entry is mean(1 x 2, 1/2 x 4) = 2; it alone never fills a buffer of 2
    assert (first, second, ready_alone) == (1.0, 0.5, False)
    assert [e.client_id for e in entries] == ["a", "b"] and entries[0].count == 2
    assert entries[0].mean_delta("w").item() == 2.0 and entries[0].staleness == [0, 3]
    assert buffer.clients == [] and buffer.updates == 0


def test_fresh_updates_at_server_lr_one_are_fedavg():
    torch.manual_seed(0)
    g = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    parts = {cid: {k: v + 0.1 * torch.randn_like(v) for k, v in g.items()} for cid in ("a", "b", "c")}
    weights = {"a": 3, "b": 5, "c": 2}
    buffer = UpdateBuffer(AsyncSettings(buffer_size=3))
    for cid in ("c", "a", "b"):
        buffer.add(cid, parts[cid], g, staleness=0, weight=weights[cid], num_examples=weights[cid], metrics={})

    new, _ = fedbuff_step(g, buffer.drain(), server_lr=1.0, max_share=1.0)
    fedavg = weighted_average([(parts[cid], weights[cid]) for cid in ("a", "b", "c")])

    for key in g:
        torch.testing.assert_close(new[key], fedavg[key], rtol=0, atol=1e-6)


def test_the_step_does_not_depend_on_the_order_entries_come_in():
    current = {"w": torch.tensor([0.1, 0.2, 0.3])}
    entries = [entry("a", 1.0, [1e-3, 2e-7, 3.0]), entry("b", 2.0, [1.0, 1e-9, 1e-4]),
               entry("c", 7.0, [3e-5, 1.0, 0.0])]

    one, _ = fedbuff_step(current, entries, server_lr=1.0, max_share=0.5)
    other, _ = fedbuff_step(current, entries[::-1], server_lr=1.0, max_share=0.5)

    assert torch.equal(one["w"], other["w"])


def test_bad_buffers_are_refused():
    current = {"w": torch.zeros(2)}
    with pytest.raises(AggregationError, match="at least one"):
        fedbuff_step(current, [], server_lr=1.0, max_share=1.0)
    with pytest.raises(AggregationError, match="one entry per client"):
        fedbuff_step(current, [entry("a", 1.0, [0, 0]), entry("a", 1.0, [0, 0])], server_lr=1.0, max_share=1.0)
    with pytest.raises(AggregationError, match="sum to > 0"):
        fedbuff_step(current, [entry("a", 0.0, [0, 0]), entry("b", 0.0, [0, 0])], server_lr=1.0, max_share=1.0)
    buffer = UpdateBuffer(AsyncSettings())
    with pytest.raises(AggregationError, match="finite"):
        buffer.add("a", {"w": torch.tensor([math.nan, 0.0])}, current, staleness=0, weight=1, num_examples=1,
                   metrics={})
    with pytest.raises(AggregationError, match="shape"):
        buffer.add("a", {"w": torch.zeros(3)}, current, staleness=0, weight=1, num_examples=1, metrics={})


def test_stale_reason_names_the_limit():
    assert stale_reason(4, 4) is None
    assert "5 aggregations old, more than max_staleness = 4" in (stale_reason(5, 4) or "")


def test_the_weights_come_from_fedavg_or_fedprox_and_nothing_else():
    plan = FedAvg(local_steps=1, lr=0.1, max_share=0.5)

    assert fedavg_plan(plan) is plan
    assert fedavg_plan(FedProx(plan=plan, mu=0.1)) is plan
    for other in (Median(plan=plan), FedOpt(plan=plan, kind="adam")):
        with pytest.raises(ValueError, match="expected a strategy among fedavg, fedprox, dynamic"):
            fedavg_plan(other)


@pytest.mark.parametrize(("kwargs", "match"), [({"buffer_size": 0}, "buffer_size"), ({"max_staleness": -1},
                         "max_staleness"), ({"staleness_exponent": -0.5}, "staleness_exponent"),
                         ({"server_lr": 0.0}, "server_lr"), ({"server_lr": math.inf}, "server_lr")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsyncSettings(**kwargs)


def test_the_version_store_keeps_only_the_versions_asked_for():
    store = VersionStore()
    for version in range(4):
        store.put(version, {"w": torch.full((1,), float(version))}, encoded=f"v{version}")

    store.keep({1, 3})

    assert len(store) == 2 and store.encoded(3) == "v3" and store.tensors(1)["w"].item() == 1.0
    with pytest.raises(KeyError):
        store.tensors(0)
