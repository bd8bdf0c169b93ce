"""A client cannot choose its own FedAvg weight or replace the global parts (issue 7, item 2).

Today's attack: an update with ``num_examples = 2**64 - 1`` and every adapter value 1e4. Before
the fix it became the new global head/tail exactly.
"""

from __future__ import annotations

import torch

from fedsplit.client.runner import ClientRunner, client_adapters
from fedsplit.protocol import encode_named, pb
from fedsplit.strategy import FedAvg

from .federation import make_federation, weighted_mean

CLAIM = 2**64 - 1


class InflatingRunner(ClientRunner):
    """Trains honestly, then reports an absurd example count (and, with ``poison``, adapters of 1e4)."""

    poison = False

    def _update(self, plan, steps, losses):
        tensors = client_adapters(self.head, self.tail)
        if self.poison:
            tensors = {k: torch.full_like(v, 1e4) for k, v in tensors.items()}
        return pb.ClientUpdate(round=plan.round, adapters=encode_named(tensors), num_examples=CLAIM,
                               metrics={"loss": sum(losses) / len(losses)})


def _turn_evil(fed, client_id, *, poison):
    honest = fed.runners[client_id]
    evil = InflatingRunner(client_id, honest.head, honest.tail, honest.batches, honest.cfg, honest.connect,
                           backoff=honest.backoff)
    evil.poison = poison
    evil.num_examples = CLAIM  # the data report at join claims it too
    fed.runners[client_id] = evil


def test_poisoned_update_is_refused_and_the_round_averages_the_honest_clients():
    fed = make_federation(["a", "b", "evil"], num_rounds=1, local_steps=2)
    _turn_evil(fed, "evil", poison=True)

    result = fed.run()

    record = result.history[0]
    assert record["clients"] == ["a", "b"] and record["failures"] == ["evil"]
    honest = {cid: value for cid, value in fed.recorder.round_updates(1).items() if cid != "evil"}
    expected = weighted_mean(honest)
    assert max(float((result.global_adapters[k].double() - expected[k]).abs().max()) for k in expected) < 1e-7
    assert max(float(v.abs().max()) for v in result.global_adapters.values()) < 10.0


def test_refusal_names_the_bound(tmp_path):
    from fedsplit.metrics import MetricsWriter, read_metrics

    with MetricsWriter(tmp_path / "m.jsonl") as metrics:
        fed = make_federation(["a", "evil"], num_rounds=1, local_steps=2, metrics=metrics)
        _turn_evil(fed, "evil", poison=True)
        fed.run()

    failed = [r for r in read_metrics(tmp_path / "m.jsonl") if r.get("event") == "client_failed"]
    assert len(failed) == 1 and failed[0]["client"] == "evil"
    assert "update refused" in failed[0]["reason"] and "update_bound_factor" in failed[0]["reason"]


def test_an_absurd_example_count_is_refused_when_the_run_bounds_it():
    fed = make_federation(["a", "evil"], num_rounds=1, local_steps=2, max_examples_per_round=2 * 2)
    _turn_evil(fed, "evil", poison=False)

    result = fed.run()

    assert result.history[0]["clients"] == ["a"] and result.history[0]["failures"] == ["evil"]


def test_a_huge_data_report_is_fixed_at_join_and_capped_at_the_maximum_share():
    # Arrange: the run does not bound the per-round count, so only the data report and max_share stand.
    fed = make_federation(["a", "b", "evil"], num_rounds=1, local_steps=2)
    fed.coordinator.strategy = FedAvg(local_steps=2, lr=fed.runners["a"].cfg.lr, max_share=0.5)
    _turn_evil(fed, "evil", poison=False)

    result = fed.run()

    updates = fed.recorder.round_updates(1)
    assert result.history[0]["clients"] == ["a", "b", "evil"]
    # evil's weight is capped to half the total; a and b (equal data) share the other half.
    shares = {"a": 0.25, "b": 0.25, "evil": 0.5}
    expected = {k: sum(updates[c][0][k].double() * s for c, s in shares.items()) for k in updates["a"][0]}
    assert max(float((result.global_adapters[k].double() - expected[k]).abs().max()) for k in expected) < 1e-6
