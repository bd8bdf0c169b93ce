"""Asynchronous FedBuff rounds (server/async_rounds.py) in an in-process federation of tiny models: nobody
waits for a slow client, its stale update is discounted exactly by the rule, and everything a client
sends is bounded as in sync rounds."""

from __future__ import annotations

import copy
import functools
import math
import threading
import time

import pytest
import torch

from fedsplit.channel import Channel
from fedsplit.client.runner import ClientRunner, client_adapters
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.protocol import decode_named, encode_named, pb
from fedsplit.server import TrunkServer
from fedsplit.server.async_rounds import AsyncCoordinator
from fedsplit.server.buffered import AsyncSettings
from fedsplit.server.rounds import CoordinatorConfig, RoundFailedError, RoundStage
from fedsplit.strategy import FedAvg, Median
from fedsplit.train.config import TrainConfig

from .federation import FAST_BACKOFF, Federation, Recorder
from tiny import build_model, token_batches

TRAIN = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0)


def make_async_federation(client_ids, *, num_rounds: int, buffer_size: int = 2, max_staleness: int = 16,
                          max_share: float = 1.0, metrics: MetricsWriter | None = None,
                          batch_sizes: dict[str, int] | None = None, checkpoint_dir=None, drops=None,
                          **config) -> Federation:
    _, server = build_model()
    # generous timeouts: some tests keep a client idle on purpose while the others train (a loaded CI machine
    # must not fail it for idleness)
    trunk = TrunkServer(server.trunk, TRAIN, total_steps=100, lease_timeout_s=30.0)
    settings = dict(round_timeout_s=120.0, step_timeout_s=60.0, join_timeout_s=30.0, join_grace_s=0.5, poll_s=0.01,
                    ordered_steps=False)
    settings.update(config)
    coordinator = AsyncCoordinator(
        trunk, FedAvg(local_steps=1, lr=TRAIN.lr, max_share=max_share), client_adapters(server.head, server.tail),
        list(client_ids), CoordinatorConfig(num_rounds=num_rounds, **settings),
        settings=AsyncSettings(buffer_size=buffer_size, max_staleness=max_staleness), metrics=metrics,
        checkpoint_dir=checkpoint_dir, run_id="test-run", config_hash="0" * 64,
    )
    fed = Federation(coordinator, {}, Recorder(), server, {})  # type: ignore[arg-type]
    for index, cid in enumerate(client_ids):
        parts = copy.deepcopy(server)  # the same initial weights, a model load saved per client
        batches = token_batches(2, (batch_sizes or {}).get(cid, 2), seed=100 + index)
        fed.runners[cid] = ClientRunner(cid, parts.head, parts.tail, batches, TRAIN,
                                        fed.connector(cid, (drops or {}).get(cid)), backoff=FAST_BACKOFF)
    return fed


class SlowLink:
    """A client's transport behind a slow link: ``delay_s`` before every FORWARD, and its first update held
    back until ``release`` is set (the fast clients' progress decides when, so the test does not race)."""

    def __init__(self, inner, delay_s: float, release: threading.Event) -> None:
        self.inner, self.delay_s, self.release = inner, delay_s, release

    def exchange(self, frame: bytes) -> bytes:
        kind = pb.Frame.FromString(frame).kind
        if kind == pb.FORWARD:
            time.sleep(self.delay_s)
        if kind == pb.CLIENT_UPDATE:
            assert self.release.wait(30), "the fast clients never got ahead"
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


class HeldUpdate:
    """A transport that holds each CLIENT_UPDATE until two rounds were aggregated after the version the
    client trained from (its frame's round is that version + 1): stale by >= 2 whatever the machine's load."""

    def __init__(self, inner, coordinator) -> None:
        self.inner, self.coordinator = inner, coordinator

    def exchange(self, frame: bytes) -> bytes:
        header = pb.Frame.FromString(frame)
        if header.kind == pb.CLIENT_UPDATE:
            deadline = time.monotonic() + 60
            while len(self.coordinator.history) < min(header.round + 1, self.coordinator.config.num_rounds):
                assert time.monotonic() < deadline, "the fast clients never got ahead"
                time.sleep(0.005)
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


class Passes:
    """Drives one client pass by pass from the test (no thread): join, train, send."""

    def __init__(self, fed: Federation, cid: str) -> None:
        self.runner = fed.runners[cid]
        self.plans: list[pb.RoundPlan] = []
        self.sent: list[dict[str, torch.Tensor]] = []

    def join(self) -> pb.RoundPlan:
        plan = self.runner._join()
        assert plan.local_steps, plan
        self.plans.append(plan)
        return plan

    def train(self) -> int:
        """Train and send the last plan's pass; the number of passes this client lost so far."""
        self.runner._train_round(self.plans[-1])
        self.sent.append(client_adapters(self.runner.head, self.runner.tail))
        return self.runner.result.lost_rounds


def started(fed: Federation) -> AsyncCoordinator:
    coordinator = fed.coordinator.start()
    deadline = time.monotonic() + 10
    while coordinator.stage is not RoundStage.TRAINING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return coordinator  # type: ignore[return-value]


def wait_rounds(coordinator, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(coordinator.history) < count:
        assert time.monotonic() < deadline, coordinator.history
        time.sleep(0.01)


def fast_rounds(coordinator, a, b, count: int) -> None:
    """``a`` and ``b`` make rounds 1..count alone, each joining again for fresh parts after every round."""
    for number in range(1, count + 1):
        for client in (a, b):
            assert client.train() == 0
        wait_rounds(coordinator, number)
        for client in (a, b):
            client.join()


def test_fast_clients_aggregate_without_the_slow_one_and_its_stale_update_is_discounted(tmp_path):
    # Arrange: a and b fast; c behind a slow link, its first update held until 2 rounds are done
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_async_federation(["a", "b", "c"], num_rounds=8, metrics=metrics)
    release = threading.Event()
    direct = fed.connector("c")

    def slow_connect() -> Channel:
        channel = direct()
        channel.transport = SlowLink(channel.transport, 0.2, release)
        return channel

    fed.runners["c"].connect = slow_connect

    def watch() -> None:  # release c's update once 2 rounds were aggregated after the one c trains from
        while not (c_plans := [r for r, cid in list(fed.recorder.plans) if cid == "c"]):
            time.sleep(0.005)
        while len(fed.coordinator.history) < max(2, min(c_plans) - 1 + 2):
            time.sleep(0.005)
        release.set()

    threading.Thread(target=watch, daemon=True).start()

    # Act
    with metrics:
        result = fed.run()

    # Assert: 8 rounds; the first two without c; c's first update came in >= 2 rounds stale and was discounted
    assert result.rounds_completed == 8 and [r["round"] for r in result.history] == list(range(1, 9))
    assert all(r["clients"] == ["a", "b"] for r in result.history[:2])
    with_c = [r for r in result.history if "c" in r["clients"]]
    assert with_c, result.history
    first = with_c[0]["updates"]["c"]["staleness"][0]
    assert first >= 2
    updates = [e for e in read_metrics(tmp_path / "metrics.jsonl", "client_update") if e["client"] == "c"]
    assert updates[0]["staleness"] == first and updates[0]["discount"] == pytest.approx((1 + first) ** -0.5)
    fast = [e for e in read_metrics(tmp_path / "metrics.jsonl", "client_update") if e["client"] != "c"]
    assert len(fast) >= 4  # a and b went on: at least two passes each before the run ended
    assert fed.coordinator.stage is RoundStage.DONE


def test_a_stale_update_moves_the_global_parts_exactly_by_the_rule():
    # Arrange: buffers of 2; a has 4 examples a batch, b and c 2 (weights 8, 4, 4 examples over 2 batches)
    fed = make_async_federation(["a", "b", "c"], num_rounds=3, batch_sizes={"a": 4, "b": 2, "c": 2})
    coordinator = started(fed)
    a, b, c = (Passes(fed, cid) for cid in "abc")
    g0 = coordinator.global_adapters
    for client in (a, b, c):
        client.join()  # every data report is in: weights a 4, b 2, c 2 (one batch per pass)

    # Act: rounds 1 and 2 by a and b; then c, still on version 0, and a fresh a make round 3
    fast_rounds(coordinator, a, b, 2)
    g2 = coordinator.global_adapters
    assert c.train() == 0 and a.train() == 0
    wait_rounds(coordinator, 3)
    g3 = coordinator.global_adapters
    coordinator.wait(10)

    # Assert: g3 = g2 + 2/3 (x_a - g2) + 1/3 x (1 + 2)^-1/2 (x_c - g0)
    record = coordinator.history[2]
    assert record["updates"] == {"a": {"staleness": [0], "share": pytest.approx(2 / 3)},
                                 "c": {"staleness": [2], "share": pytest.approx(1 / 3)}}
    c_base = decode_named(c.plans[0].adapters, "plan")  # c trained from version 0: g0
    assert c.plans[0].round == 1 and all(torch.equal(c_base[key], g0[key]) for key in g0)
    for key in g3:
        expected = (g2[key].double() + 2 / 3 * (a.sent[-1][key].double() - g2[key].double())
                    + 1 / 3 * 3 ** -0.5 * (c.sent[0][key].double() - g0[key].double()))
        torch.testing.assert_close(g3[key].double(), expected, rtol=1e-6, atol=1e-7)
    assert any((c.sent[0][key] != g0[key]).any() for key in g0)  # c's pass did move its parts


def test_an_update_past_max_staleness_is_refused_and_the_client_gets_fresh_parts(tmp_path):
    # Arrange: max_staleness 1; c holds version 0 while a and b make two rounds
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_async_federation(["a", "b", "c"], num_rounds=3, max_staleness=1, metrics=metrics)
    coordinator = started(fed)
    a, b, c = (Passes(fed, cid) for cid in "abc")
    with metrics:
        for client in (a, b, c):
            client.join()
        fast_rounds(coordinator, a, b, 2)

        # Act: c trains on version 0, two rounds old
        lost = c.train()
        fresh = c.join()
        coordinator.stop()

    # Assert: its first trunk step was refused as stale; its next plan carries version 2
    assert lost == 1 and fresh.round == 3
    assert torch.equal(decode_named(fresh.adapters, "plan")[next(iter(coordinator.global_adapters))],
                       next(iter(coordinator.global_adapters.values())))
    [failure] = [e for e in read_metrics(tmp_path / "metrics.jsonl", "client_failed") if e["client"] == "c"]
    assert "stale: trained on global parts 2 aggregations old, more than max_staleness = 1" in failure["reason"]


def _move_far(update: pb.ClientUpdate) -> None:
    tensors = {k: v + 1.0 for k, v in decode_named(update.adapters, "u").items()}
    del update.adapters[:]
    update.adapters.extend(encode_named(tensors))


def _nan_loss(update: pb.ClientUpdate) -> None:
    update.metrics["loss"] = math.nan


@pytest.mark.parametrize(("poison", "reason"), [(_move_far, "(update_bound_factor)"),
                                                (_nan_loss, "ClientUpdate.metrics: expected finite values")])
def test_an_update_out_of_bounds_is_refused_as_in_sync_rounds(tmp_path, poison, reason):
    # Arrange: update_bound_factor 1: an element may move 1 x 1 step x lr 0.01
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_async_federation(["a", "b"], num_rounds=1, update_bound_factor=1.0, metrics=metrics)
    coordinator = started(fed)
    a = Passes(fed, "a")
    with metrics:
        a.join()
        original = a.runner._update

        def poisoned(plan, steps, losses):
            update = original(plan, steps, losses)
            poison(update)
            return update

        a.runner._update = poisoned

        # Act
        lost = a.train()
        coordinator.stop()

    # Assert
    assert lost == 1 and coordinator.history == []
    [failure] = read_metrics(tmp_path / "metrics.jsonl", "client_failed")
    assert failure["reason"].startswith("update refused:") and reason in failure["reason"]


def test_async_needs_fedavg_weights_and_a_buffer_the_clients_can_fill():
    _, server = build_model()
    trunk = TrunkServer(server.trunk, TRAIN, total_steps=10)
    parts = client_adapters(server.head, server.tail)
    plan = FedAvg(local_steps=1, lr=0.1)
    cfg = CoordinatorConfig(num_rounds=1)

    with pytest.raises(ValueError, match="expected a strategy among fedavg, fedprox, dynamic, got 'median'"):
        AsyncCoordinator(trunk, Median(plan=plan), parts, ["a", "b"], cfg, settings=AsyncSettings())
    with pytest.raises(ValueError, match=r"buffer_size: expected 2..2 \(the clients\), got 3"):
        AsyncCoordinator(trunk, plan, parts, ["a", "b"], cfg, settings=AsyncSettings(buffer_size=3))


def test_over_grpc_a_client_behind_a_shaped_link_is_not_waited_for(tmp_path):
    # Arrange: a real gRPC server (insecure: no TLS files; frames stay sealed); c dials it through a
    # ShapingProxy adding 200 ms each way (handshake + a pass: >= 7 round trips, 2.8 s), a and b dial it directly;
    # c's updates are also held until the fast two made 2 rounds past c's version (no race on a loaded machine)
    from fedsplit.protocol import PROTOCOL_VERSION
    from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
    from fedsplit.security.identity import generate_identity
    from fedsplit.transport.grpc_client import connect_grpc
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import ClientCredentials, SessionFactory
    from fedsplit.transport.shaping import LinkShape, shaped_address

    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_async_federation(["a", "b", "c"], num_rounds=80, max_staleness=1000, metrics=metrics)
    coordinator = fed.coordinator
    server_key, config_hash = generate_identity(), hash_run_config({"test": "async"})
    identities = {cid: generate_identity() for cid in "abc"}
    verifier = HandshakeVerifier(server_key, {cid: key.public_key() for cid, key in identities.items()}, [],
                                 int(PROTOCOL_VERSION), config_hash, run_id="test-run")
    server = GrpcServer("127.0.0.1:0", SessionFactory(verifier, coordinator.handler_for, "test-run"), insecure=True,
                        on_disconnect=coordinator.on_disconnect).start()
    direct = f"127.0.0.1:{server.port}"
    slow, _, proxy = shaped_address(direct, LinkShape(latency_ms=200, seed=1))
    def held(connect):
        channel = connect()
        channel.transport = HeldUpdate(channel.transport, coordinator)  # above the shaped socket
        return channel

    for cid, runner in fed.runners.items():
        credentials = ClientCredentials(identities[cid], server_key.public_key(), cid, "test-run", config_hash)
        runner.connect = functools.partial(connect_grpc, slow if cid == "c" else direct, credentials, insecure=True)
    fed.runners["c"].connect = functools.partial(held, fed.runners["c"].connect)

    # Act
    try:
        with metrics:
            result = fed.run(timeout=120)
    finally:
        server.stop(0)
        if proxy is not None:
            proxy.close()

    # Assert: 80 rounds; the fast two made the first ones alone; c's updates came in stale and discounted
    assert result.rounds_completed == 80
    assert all(r["clients"] == ["a", "b"] for r in result.history[:2]), result.history[:3]
    c_updates = [e for e in read_metrics(tmp_path / "metrics.jsonl", "client_update") if e["client"] == "c"]
    assert c_updates and c_updates[0]["staleness"] >= 2, c_updates
    for event in c_updates:
        assert event["discount"] == pytest.approx((1 + event["staleness"]) ** -0.5)
    rounds_with_c = [r["updates"]["c"]["staleness"] for r in result.history if "c" in r["clients"]]
    assert [tau for taus in rounds_with_c for tau in taus] == [e["staleness"] for e in c_updates][:sum(map(len,
                                                                                                rounds_with_c))]


def test_every_round_is_checkpointed_and_a_resumed_run_goes_on_from_the_last(tmp_path):
    # Arrange: 2 rounds with checkpoints
    from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint

    fed = make_async_federation(["a", "b"], num_rounds=2, checkpoint_dir=tmp_path / "ckpt")
    first = fed.run()
    saved = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))

    # Act: a new server for 3 rounds resumes from it
    again = make_async_federation(["a", "b"], num_rounds=3)
    again.coordinator.restore(saved)
    resumed = again.run()

    # Assert
    assert saved.round == 2 and all(torch.equal(saved.global_adapters[k], v) for k, v in first.global_adapters.items())
    assert saved.round_clients == ("a", "b") and sum(saved.client_steps.values()) >= 4
    assert resumed.rounds_completed == 3 and [r["round"] for r in resumed.history] == [3]


def test_the_run_fails_when_no_round_is_aggregated_within_the_round_timeout():
    # Arrange: buffers of 2 but only a ever joins
    fed = make_async_federation(["a", "b"], num_rounds=1, round_timeout_s=1.0, step_timeout_s=0.4, poll_s=0.01)
    runner = fed.runners.pop("b")
    assert runner.client_id == "b"

    # Act / Assert
    fed.start_clients()
    fed.coordinator.start()
    with pytest.raises(RoundFailedError, match="round 1: too few results"):
        fed.coordinator.wait(20)
    assert fed.coordinator.stage is RoundStage.FAILED


def test_a_client_that_drops_mid_pass_loses_that_pass_only_and_trains_on_after_reconnecting(tmp_path):
    # Arrange: b's first session breaks after its first BACKWARD (its trunk step half done)
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_async_federation(["a", "b"], num_rounds=4, metrics=metrics,
                                drops={"b": lambda session, kind, count: session == 1 and kind == pb.BACKWARD})

    # Act
    with metrics:
        result = fed.run()

    # Assert: the pass was failed (its partial step discarded); b came back and every round had both
    [failure] = [e for e in read_metrics(tmp_path / "metrics.jsonl", "client_failed") if e["round"] <= 4
                 and "last round" not in e["reason"]]
    assert (failure["client"], failure["reason"], failure["partial_step_discarded"]) == ("b", "disconnected", True)
    assert result.rounds_completed == 4 and all(r["clients"] == ["a", "b"] for r in result.history)
    assert fed.outcomes["b"].reconnects == 1
