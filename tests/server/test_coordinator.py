"""Rounds end to end: aggregation of exactly the survivors, no drift, refusals, dropouts, timeouts."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from fedsplit.adapters import adapter_state_dict, trainable_parameters
from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.client import SplitClient
from fedsplit.client.runner import RunAbortedError, client_adapters, data_order, load_client_adapters
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.protocol import decode_named, decode_tensor, encode_named, encode_tensor, pb
from fedsplit.server.batching import BatchingTrunkServer
from fedsplit.server.coordinator import RoundFailedError, RoundStage, RunStoppedError
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig

from .federation import join_until_plan, make_federation, weighted_mean
from tiny import build_model, token_batches


def _assert_close(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    worst = max(float((actual[k].double() - expected[k].double()).abs().max()) for k in actual)
    assert worst <= atol, f"max difference {worst} > {atol}"


def test_three_clients_two_rounds_global_is_example_weighted_mean_of_returned_adapters():
    # Arrange: batch sizes 1, 2, 3 give the clients different FedAvg weights
    fed = make_federation(["a", "b", "c"], num_rounds=2, local_steps=2, batch_sizes={"a": 1, "b": 2, "c": 3})
    initial = fed.coordinator.global_adapters

    # Act
    result = fed.run()

    # Assert
    assert result.rounds_completed == 2 and fed.coordinator.stage is RoundStage.DONE
    assert [r["clients"] for r in result.history] == [["a", "b", "c"], ["a", "b", "c"]]
    round1, round2 = fed.recorder.round_updates(1), fed.recorder.round_updates(2)
    assert {cid: n for cid, (_, n) in round1.items()} == {"a": 2, "b": 4, "c": 6}  # 2 steps x batch size
    for cid in ("a", "b", "c"):  # round 2 started from round 1's aggregate
        _assert_close(fed.recorder.plans[(2, cid)], weighted_mean(round1), atol=1e-7)
    _assert_close(result.global_adapters, weighted_mean(round2), atol=1e-7)
    assert max(float((result.global_adapters[k] - initial[k]).abs().max()) for k in initial) > 1e-4
    assert fed.coordinator.client_steps == {"a": 4, "b": 4, "c": 4}
    assert fed.coordinator.trunk.steps_taken == 12


def test_client_batching_trunk_server_runs_the_same_rounds():
    # Arrange: the three clients' steps share trunk passes ("client-batch" mode); no turn order
    fed = make_federation(["a", "b", "c"], num_rounds=2, local_steps=2, batch_sizes={"a": 1, "b": 2, "c": 3},
                          trunk_server=BatchingTrunkServer, ordered_steps=False)

    # Act
    result = fed.run()

    # Assert
    assert [r["clients"] for r in result.history] == [["a", "b", "c"], ["a", "b", "c"]]
    _assert_close(result.global_adapters, weighted_mean(fed.recorder.round_updates(2)), atol=1e-7)
    assert fed.coordinator.client_steps == {"a": 4, "b": 4, "c": 4}
    assert fed.coordinator.trunk.stats.partial_steps == 0


def test_one_client_federated_rounds_equal_centralized_training():
    # Arrange: Adam with betas (0, 0) keeps no state between steps, so FedAvg's per-round optimizer
    # reset is invisible and rounds x local_steps federated steps must equal as many centralized ones.
    # The cosine schedule with warm-up checks first_step; 4 batches for 6 steps cross an epoch.
    cfg = TrainConfig(lr=1e-2, betas=(0.0, 0.0), schedule="cosine", warmup_steps=1, max_grad_norm=0.5, seed=3)
    rounds, local_steps = 3, 2
    fed = make_federation(["solo"], num_rounds=rounds, local_steps=local_steps, cfg=cfg)
    model, central = build_model()
    params = [p for part in central for p in trainable_parameters(part)]
    trainer = CentralizedTrainer(model, params, cfg, total_steps=rounds * local_steps)
    batches = token_batches(4, 2, seed=100)  # the data make_federation gives its first client

    # Act
    result = fed.run()
    for index in data_order(len(batches), cfg.seed, 0, rounds * local_steps):
        trainer.train_step([batches[index]])

    # Assert
    _assert_close(result.global_adapters, client_adapters(central.head, central.tail), atol=1e-5)
    _assert_close(result.trunk_adapters, adapter_state_dict(central.trunk), atol=1e-5)
    moved = max(float((result.trunk_adapters[k] - fed.initial_trunk[k]).abs().max()) for k in fed.initial_trunk)
    assert moved > 1e-3  # training really happened


def test_client_dropping_mid_round_leaves_an_aggregate_of_exactly_the_survivors(tmp_path):
    # Arrange: c's first session breaks right after the trunk answered its second FORWARD, i.e.
    # while c holds the trunk and the trunk holds c's half-done step
    drop_second_forward = lambda session, kind, count: session == 1 and kind == pb.FORWARD and count == 2  # noqa: E731
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(
        ["a", "b", "c"], num_rounds=2, local_steps=2, min_clients=2,
        batch_sizes={"a": 1, "b": 3, "c": 2}, drops={"c": drop_second_forward}, metrics=metrics,
    )

    # Act
    with metrics:
        result = fed.run()

    # Assert: round 1 = a and b only; c was readmitted in round 2
    assert [(r["clients"], r["failures"]) for r in result.history] == [(["a", "b"], ["c"]), (["a", "b", "c"], [])]
    assert set(fed.recorder.round_updates(1)) == {"a", "b"}
    _assert_close(fed.recorder.plans[(2, "c")], weighted_mean(fed.recorder.round_updates(1)), atol=1e-7)
    _assert_close(result.global_adapters, weighted_mean(fed.recorder.round_updates(2)), atol=1e-7)
    [failure] = read_metrics(tmp_path / "metrics.jsonl", "client_failed")
    assert failure["client"] == "c" and failure["reason"] == "disconnected" and failure["partial_step_discarded"]
    # trunk steps: round 1 a 2 + b 2 + c 1 (its second one was discarded), round 2: 3 x 2
    assert fed.coordinator.trunk.steps_taken == 11
    assert fed.coordinator.client_steps == {"a": 4, "b": 4, "c": 2}
    assert fed.outcomes["c"].reconnects == 1 and [r.round for r in fed.outcomes["c"].rounds] == [2]


def _wrong_round(round: int, tensors: dict) -> tuple[int, dict]:
    return round + 1, tensors


def _wrong_keys(round: int, tensors: dict) -> tuple[int, dict]:
    first = sorted(tensors)[0]
    renamed = {("head/bogus" if k == first else k): v for k, v in tensors.items()}
    return round, renamed


def _wrong_shape(round: int, tensors: dict) -> tuple[int, dict]:
    first = sorted(tensors)[0]
    return round, {k: (v[:1] if k == first else v) for k, v in tensors.items()}


@pytest.mark.parametrize(
    "tamper, code, message",
    [
        (_wrong_round, "FAILED_PRECONDITION", r"ClientUpdate.round: expected 1 \(the current round\), got 2"),
        (_wrong_keys, "BAD_REQUEST",
         r"keys do not match the global adapters: missing 1 \['head/.+'\], unexpected 1 \['head/bogus'\]"),
        (_wrong_shape, "BAD_REQUEST",
         r"ClientUpdate.adapters\[head/.+lora_A.weight\]: expected shape \(2, 64\), got \(1, 64\)"),
    ],
    ids=["round", "keys", "shape"],
)
def test_bad_client_update_is_refused_clearly_and_the_others_continue(tamper, code, message):
    # Arrange: a and b are normal clients; x trains its steps honestly, then sends a tampered update
    fed = make_federation(["a", "b", "x"], num_rounds=1, local_steps=1, min_clients=2, runners_for=["a", "b"],
                          join_grace_s=30.0)  # x is slow to start under load: the round waits for it
    refused: list[BaseException] = []

    def scripted_x() -> None:
        _, parts = build_model()
        channel = fed.connector("x")()
        plan = join_until_plan(channel)
        load_client_adapters(parts.head, parts.tail, decode_named(plan.adapters, "plan"))
        client = SplitClient(parts.head, parts.tail, channel, TrainConfig(lr=1e-2), total_steps=1)
        client.round = plan.round
        client.train_step(token_batches(1, 2, seed=7))
        round, tensors = tamper(plan.round, client_adapters(parts.head, parts.tail))
        update = pb.ClientUpdate(round=round, adapters=encode_named(tensors), num_examples=2, metrics={"loss": 1.0})
        try:
            channel.call(pb.CLIENT_UPDATE, update, round=plan.round)
        except RemoteError as exc:
            refused.append(exc)

    x = threading.Thread(target=scripted_x, daemon=True)
    x.start()

    # Act
    result = fed.run()
    x.join(30)

    # Assert
    [error] = refused
    assert pb.ErrorCode.Name(error.code) == code
    assert re.search(message, error.remote_message), error.remote_message
    assert result.history[0]["clients"] == ["a", "b"] and result.history[0]["failures"] == ["x"]
    _assert_close(result.global_adapters, weighted_mean(fed.recorder.round_updates(1)), atol=1e-7)


def test_silent_participant_times_out_and_the_round_completes_without_it(tmp_path):
    # Arrange: "a" collects its plan and then sends nothing; it is first in the trunk's turn order
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b", "c"], num_rounds=1, local_steps=1, min_clients=2, runners_for=["b", "c"],
                          step_timeout_s=1.0, metrics=metrics)
    silent = threading.Thread(target=lambda: join_until_plan(fed.connector("a")()), daemon=True)
    silent.start()

    # Act
    with metrics:
        result = fed.run()

    # Assert
    assert result.history[0]["clients"] == ["b", "c"] and result.history[0]["failures"] == ["a"]
    [failure] = read_metrics(tmp_path / "metrics.jsonl", "client_failed")
    assert (failure["client"], failure["stage"], failure["reason"]) == ("a", "training", "no request for 1.0 s")


def test_participant_that_never_finishes_fails_at_the_round_deadline(tmp_path):
    # Arrange: "a" takes its plan, then only asks for evaluation (refused mid-round); it never trains
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1, min_clients=1, runners_for=["b"],
                          round_timeout_s=1.5, ordered_steps=False, metrics=metrics)
    hidden, mask = torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.bool)
    probe = pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(mask),
                       position_ids=encode_tensor(torch.arange(4)[None]), train=False)

    refusals: list[str] = []

    def idler() -> None:
        channel = fed.connector("a")()
        join_until_plan(channel)
        while fed.coordinator.stage is not RoundStage.DONE:
            try:
                channel.call(pb.FORWARD, probe)
            except RemoteError as exc:  # evaluation is served between rounds only
                refusals.append(str(exc))
            time.sleep(0.05)

    threading.Thread(target=idler, daemon=True).start()

    # Act
    with metrics:
        result = fed.run()

    # Assert
    assert result.history[0]["clients"] == ["b"] and result.history[0]["failures"] == ["a"]
    [failure] = read_metrics(tmp_path / "metrics.jsonl", "client_failed")
    assert (failure["client"], failure["reason"]) == ("a", "round timeout after 1.5 s")
    assert refusals and all("evaluation is served between rounds only" in r for r in refusals)


def test_round_with_too_few_results_is_retried_then_fails_and_leaves_no_trace(tmp_path):
    # Arrange: min_clients 2, but b's every session breaks at its first FORWARD
    drop_first_forward = lambda session, kind, count: kind == pb.FORWARD and count == 1  # noqa: E731
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=2, local_steps=2, min_clients=2, max_round_retries=1,
                          drops={"b": drop_first_forward}, metrics=metrics)
    threads = fed.start_clients()

    # Act
    fed.coordinator.start()
    expected = r"round 1: too few results after 2 attempt\(s\); failures: b \(training\): disconnected"
    with metrics, pytest.raises(RoundFailedError, match=expected):
        fed.coordinator.wait(60)
    for thread in threads:
        thread.join(30)

    # Assert: a's trunk steps were rolled back; both clients were told the run failed
    assert fed.coordinator.stage is RoundStage.FAILED
    assert fed.coordinator.trunk.steps_taken == 0
    _assert_close(fed.coordinator.trunk_adapters(), fed.initial_trunk, atol=0.0)
    assert [e["attempt"] for e in read_metrics(tmp_path / "metrics.jsonl", "round_failed")] == [1, 2]
    assert all(isinstance(fed.outcomes[cid], RunAbortedError) for cid in ("a", "b"))


def test_stop_abandons_the_round_in_progress_and_keeps_the_last_checkpoint(tmp_path):
    # Arrange: client b asks the server to stop at its first step of round 2
    fed = make_federation(["a", "b"], num_rounds=3, local_steps=2, checkpoint_dir=tmp_path)
    stop_in_round_2 = lambda round, step, result: round == 2 and fed.coordinator.stop()  # noqa: E731
    fed.runners["b"].on_step = stop_in_round_2
    threads = fed.start_clients()

    # Act
    fed.coordinator.start()
    with pytest.raises(RunStoppedError, match="stopped after round 1 of 3"):
        fed.coordinator.wait(60)
    for thread in threads:
        thread.join(30)

    # Assert
    assert fed.coordinator.stage is RoundStage.FAILED and fed.coordinator.completed_round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001"]
    assert all(isinstance(fed.outcomes[cid], RunAbortedError) for cid in ("a", "b"))


def test_trunk_requests_from_a_client_outside_the_round_are_refused_but_evaluation_is_served():
    # Arrange: no round is running yet
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1)
    channel = fed.connector("a")()
    hidden, mask, positions = torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None]

    def forward(train: bool) -> pb.Forward:
        return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(mask),
                          position_ids=encode_tensor(positions), train=train)

    # Act / Assert
    expected = "FAILED_PRECONDITION: FORWARD: client a is not a participant of the current round"
    with pytest.raises(RemoteError, match=expected):
        channel.call(pb.FORWARD, forward(train=True), round=1, step=1)
    reply = channel.call(pb.FORWARD, forward(train=False))
    assert decode_tensor(reply.hidden, "ForwardResult.hidden").shape == (1, 4, 64)


def test_a_client_outside_the_roster_is_refused():
    fed = make_federation(["a"], num_rounds=1, local_steps=1)
    channel, _ = in_process_channel("mallory", fed.coordinator.handler_for("mallory"))

    with pytest.raises(RemoteError, match="PERMISSION_DENIED: client 'mallory' is not admitted to this run"):
        channel.call(pb.JOIN_ROUND, pb.JoinRound())
