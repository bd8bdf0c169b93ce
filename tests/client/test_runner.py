"""The client runner: data order, backoff, wait_s, reconnects, per-round optimizer, evaluation."""

from __future__ import annotations

import random

import pytest
import torch

from fedsplit.adapters import trainable_parameters
from fedsplit.channel import in_process_channel
from fedsplit.client.runner import (
    Backoff,
    ClientRunner,
    ReconnectGaveUpError,
    RunAbortedError,
    client_adapters,
    data_order,
)
from fedsplit.protocol import ProtocolError, encode_named, pb
from fedsplit.security.errors import ServerAuthenticationError, ServerCertificateError
from fedsplit.server import TrunkServer
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator
from fedsplit.strategy import FedAvg
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig
from fedsplit.transport.errors import HandshakeRefusedError

from tiny import build_model, token_batches

CFG = TrainConfig(lr=1e-2)
FAST = Backoff(base_s=0.001, max_s=0.004, max_attempts=3)


def test_data_order_is_a_stream_of_seeded_epoch_permutations():
    # Arrange / Act
    stream = data_order(5, seed=1, start=0, count=15)
    window = data_order(5, seed=1, start=7, count=6)

    # Assert: every epoch covers each batch once; any window is a slice of the same stream
    assert all(sorted(stream[e * 5 : (e + 1) * 5]) == list(range(5)) for e in range(3))
    assert window == stream[7:13]
    assert data_order(5, seed=2, start=0, count=15) != stream


def test_backoff_doubles_up_to_the_cap_with_seeded_jitter():
    backoff = Backoff(base_s=0.5, max_s=4.0, max_attempts=9)

    delays = [backoff.delay(n, random.Random("s")) for n in range(6)]
    again = [backoff.delay(n, random.Random("s")) for n in range(6)]

    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(cap * 0.5 <= d <= cap for d, cap in zip(delays, caps, strict=False))
    assert delays == again


class FakeServer:
    """Answers JOIN_ROUND from a script of plans; counts connections and joins."""

    def __init__(self, plans: list[pb.RoundPlan], refuse: ProtocolError | None = None) -> None:
        self.plans, self.refuse = plans, refuse
        self.joins = 0
        self.connects = 0

    def connect(self):
        self.connects += 1
        channel, _ = in_process_channel("a", self.handle)
        return channel

    def handle(self, kind, round, step, request):
        assert kind == pb.JOIN_ROUND
        if self.refuse is not None:
            raise self.refuse
        self.joins += 1
        return self.plans[min(self.joins, len(self.plans)) - 1]


def test_runner_waits_as_told_then_loads_the_final_adapters(model_and_parts):
    # Arrange
    _, parts = model_and_parts
    final = {k: v + 0.5 for k, v in client_adapters(parts.head, parts.tail).items()}
    waiting = pb.RoundPlan(round=1, wait_s=0.01)
    server = FakeServer([waiting, waiting, pb.RoundPlan(round=4, finished=True, adapters=encode_named(final))])
    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, server.connect, backoff=FAST)

    # Act
    result = runner.run()

    # Assert
    assert server.joins == 3 and result.final_round == 4 and result.rounds == []
    for key, value in client_adapters(parts.head, parts.tail).items():
        assert torch.equal(value, final[key]), key


def test_runner_reconnects_after_connection_errors(model_and_parts):
    # Arrange: the first two connection attempts fail
    _, parts = model_and_parts
    server = FakeServer(
        [pb.RoundPlan(round=1, finished=True, adapters=encode_named(client_adapters(parts.head, parts.tail)))]
    )
    failures = iter([ConnectionError("refused"), TimeoutError("no answer")])

    def flaky_connect():
        error = next(failures, None)
        if error is not None:
            raise error
        return server.connect()

    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, flaky_connect, backoff=FAST)

    # Act
    result = runner.run()

    # Assert
    assert result.reconnects == 2 and server.connects == 1 and result.final_round == 1


def test_runner_gives_up_after_max_attempts(model_and_parts):
    _, parts = model_and_parts
    attempts = []

    def dead_connect():
        attempts.append(1)
        raise ConnectionError("no route to host")

    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, dead_connect, backoff=FAST)

    with pytest.raises(ReconnectGaveUpError, match="gave up after 3 attempts: no route to host"):
        runner.run()
    assert len(attempts) == 4


def test_runner_stops_when_the_server_refuses_it(model_and_parts):
    _, parts = model_and_parts
    server = FakeServer([], refuse=ProtocolError("client 'a' is not admitted to this run", code=pb.PERMISSION_DENIED))
    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, server.connect, backoff=FAST)

    with pytest.raises(RunAbortedError, match="PERMISSION_DENIED: client 'a' is not admitted"):
        runner.run()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (pb.PERMISSION_DENIED, "client 'a' is not admitted to this run"),
        (pb.PERMISSION_DENIED, "client 'a' (key 0123456789abcdef) is revoked"),
        (pb.FAILED_PRECONDITION, "configuration mismatch ...; the sections that differ: train"),
        (pb.FAILED_PRECONDITION, "client 'a' speaks protocol version 1, this server speaks 2"),
        (pb.UNAUTHENTICATED, "hello from client 'a' is stale"),
    ],
)
def test_a_refused_session_ends_the_run_at_once_saying_retrying_cannot_fix_it(model_and_parts, code, message):
    # Arrange: every connection attempt is refused in the handshake
    _, parts = model_and_parts
    attempts = []

    def refused_connect():
        attempts.append(1)
        raise HandshakeRefusedError(code, message)

    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, refused_connect, backoff=FAST)

    # Act / Assert
    with pytest.raises(RunAbortedError, match="Retrying cannot fix this") as info:
        runner.run()
    assert len(attempts) == 1 and message in str(info.value) and pb.ErrorCode.Name(code) in str(info.value)


def test_a_server_that_fails_authentication_or_a_wrong_certificate_is_not_retried(model_and_parts):
    _, parts = model_and_parts
    for error in (
        ServerAuthenticationError("possible man in the middle"),
        ServerCertificateError("the server's certificate does not name 10.0.0.5"),
    ):
        attempts: list[int] = []

        def connect(error=error, attempts=attempts):
            attempts.append(1)
            raise error

        runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, connect, backoff=FAST)
        with pytest.raises(RunAbortedError, match=f"cannot open a session: {error}. Retrying cannot fix this"):
            runner.run()
        assert len(attempts) == 1


def test_a_refusal_for_lack_of_resources_is_retried_with_backoff(model_and_parts):
    # Arrange: the replay cache is full for this client twice, then the session opens
    _, parts = model_and_parts
    final = encode_named(client_adapters(parts.head, parts.tail))
    server = FakeServer([pb.RoundPlan(round=1, finished=True, adapters=final)])
    refusals = iter([HandshakeRefusedError(pb.RESOURCE_EXHAUSTED, "retry later")] * 2)

    def busy_connect():
        error = next(refusals, None)
        if error is not None:
            raise error
        return server.connect()

    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, busy_connect, backoff=FAST)

    # Act
    result = runner.run()

    # Assert
    assert result.reconnects == 2 and result.final_round == 1


def _coordinator(num_rounds: int, local_steps: int) -> RoundCoordinator:
    _, server = build_model()
    trunk = TrunkServer(server.trunk, CFG, total_steps=num_rounds * local_steps)
    config = CoordinatorConfig(num_rounds=num_rounds, poll_s=0.01, step_timeout_s=10.0, join_timeout_s=30.0)
    strategy = FedAvg(local_steps=local_steps, lr=CFG.lr)
    return RoundCoordinator(trunk, strategy, client_adapters(server.head, server.tail), ["a"], config)


def test_optimizer_state_is_fresh_every_round_and_the_schedule_continues(model_and_parts):
    # Arrange
    _, parts = model_and_parts
    coordinator = _coordinator(num_rounds=2, local_steps=3)
    connect = lambda: in_process_channel("a", coordinator.handler_for("a"))[0]  # noqa: E731
    steps = []
    on_step = lambda round, step, result: steps.append((round, step, result.lr > 0))  # noqa: E731
    runner = ClientRunner(
        "a", parts.head, parts.tail, token_batches(2, 2, 0), CFG, connect, backoff=FAST, on_step=on_step
    )

    # Act
    coordinator.start()
    result = runner.run()
    coordinator.wait(60)

    # Assert: round 2's AdamW has seen 3 steps, not 6; its LR schedule resumed at step 3
    assert [(r.round, r.first_step) for r in result.rounds] == [(1, 0), (2, 3)]
    assert steps == [(1, 1, True), (1, 2, True), (1, 3, True), (2, 4, True), (2, 5, True), (2, 6, True)]
    adam_steps = {float(state["step"]) for state in runner.client.optimizer.state.values()}
    assert adam_steps == {3.0}
    assert runner.client.steps_taken == 6


def test_evaluate_equals_the_unsplit_model_loss(model_and_parts):
    # Arrange: no round runs; the coordinator still serves evaluation FORWARDs of known clients
    model, parts = model_and_parts
    coordinator = _coordinator(num_rounds=1, local_steps=1)
    connect = lambda: in_process_channel("a", coordinator.handler_for("a"))[0]  # noqa: E731
    runner = ClientRunner("a", parts.head, parts.tail, token_batches(1, 2, 0), CFG, connect)
    batches = token_batches(3, 2, seed=5)
    centralized = CentralizedTrainer(model, [p for part in parts for p in trainable_parameters(part)], CFG, 1)

    # Act
    loss = runner.evaluate(batches)

    # Assert
    assert loss == pytest.approx(centralized.eval_loss(batches), abs=1e-6)
