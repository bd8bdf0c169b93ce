"""The trunk's "pass" lease (server/trunk_lease.py): equal to "step" bit for bit when clients' steps do
not interleave; when they do, a client's gradient is taken at the weights its FORWARD saw."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from fedsplit.adapters import trainable_parameters
from fedsplit.config import RunConfig, ServerConfig
from fedsplit.configio import load_config
from fedsplit.protocol import ProtocolError, encode_tensor, pb
from fedsplit.recipes.network import make_trunk_server
from fedsplit.server import TrunkServer
from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint
from fedsplit.server.trunk import commit_step
from fedsplit.server.trunk_lease import LEASES
from fedsplit.split import split_model
from fedsplit.split.prefix import add_part_prefixes
from fedsplit.train.config import TrainConfig

from .federation import make_federation
from tiny import build_model, randomize_adapters

CFG = TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=1, max_grad_norm=1.0)
B, T, H = 2, 6, 64  # tiny-llama's hidden size


@pytest.fixture(scope="module")
def trunk0():
    """A tiny-llama trunk (4 blocks) whose LoRA adapters are non-zero, so they change the gradients."""
    torch.manual_seed(0)
    _, parts = build_model()
    randomize_adapters([parts.trunk], 0.1)
    return parts.trunk


def _server(trunk0, lease: str) -> TrunkServer:
    return TrunkServer(copy.deepcopy(trunk0), CFG, total_steps=12, lease_timeout_s=2.0, lease=lease)


def _tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's hidden state (B, T, H) and the gradient the client sends back for it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g) * 0.1


def _forward(server: TrunkServer, cid: str, seed: int) -> pb.ForwardResult:
    hidden, _ = _tensors(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    positions = torch.arange(T).expand(B, T).contiguous()
    request = pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(mask),
                         position_ids=encode_tensor(positions), train=True)
    return server.handle(cid, pb.FORWARD, 1, 0, request)


def _backward(server: TrunkServer, cid: str, seed: int) -> pb.BackwardResult:
    return server.handle(cid, pb.BACKWARD, 1, 0, pb.Backward(grad=encode_tensor(_tensors(seed)[1])))


def _step(server: TrunkServer, cid: str, sq: float = 0.25) -> pb.OptimizerResult:
    return server.handle(cid, pb.OPTIMIZER_STEP, 1, 0, pb.OptimizerStep(client_grad_sq_norm=sq))


def _full_step(server: TrunkServer, cid: str, seeds: list[int]) -> list[bytes]:
    replies = []
    for seed in seeds:
        replies.append(_forward(server, cid, seed).SerializeToString())
        replies.append(_backward(server, cid, seed).SerializeToString())
    replies.append(_step(server, cid).SerializeToString())
    return replies


def _reference_grads(trunk: torch.nn.Module, seeds: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """By hand: the trunk's parameter gradient (summed over micro-batches) and each micro-batch's input gradient."""
    trunk = copy.deepcopy(trunk)
    inputs = []
    for seed in seeds:
        hidden, grad = _tensors(seed)
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, -2:] = False
        hidden.requires_grad_()
        trunk(hidden, mask, torch.arange(T).expand(B, T).contiguous()).backward(grad)
        inputs.append(hidden.grad)
    return [p.grad.clone() for p in trainable_parameters(trunk)], inputs


def _assert_same_state(a: TrunkServer, b: TrunkServer) -> None:
    assert a.steps_taken == b.steps_taken and len(a.optimizer.state) == len(b.optimizer.state)
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q) and p.grad is None and q.grad is None
    for p, q in zip(a.params, b.params, strict=True):
        for key, value in a.optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.optimizer.state[q][key]))


def test_pass_equals_step_bitwise_when_steps_do_not_interleave(trunk0):
    # Arrange: three clients take turns, two micro-batches per step (gradient accumulation)
    turns = [("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6]), ("a", [7, 8]), ("b", [9, 10]), ("c", [11, 12])]
    step, passed = _server(trunk0, "step"), _server(trunk0, "pass")

    # Act
    step_replies = [r for cid, seeds in turns for r in _full_step(step, cid, seeds)]
    pass_replies = [r for cid, seeds in turns for r in _full_step(passed, cid, seeds)]

    # Assert: every reply and the whole optimizer state equal, no step was stale
    assert pass_replies == step_replies
    _assert_same_state(passed, step)
    assert passed.passes.staleness == {0: 6} and passed.passes.in_flight() == []


@pytest.mark.parametrize("micro", [1, 2])
def test_interleaved_step_gets_the_gradient_at_the_weights_of_its_forward(trunk0, micro):
    # Arrange: A's first FORWARD at W0; B takes a whole step (W0 -> W1) before A's BACKWARD (and 2nd micro-batch)
    server = _server(trunk0, "pass")
    a_seeds = [20 + i for i in range(micro)]
    grads_w0, inputs_w0 = _reference_grads(trunk0, a_seeds)

    # Act: A.forward, B.forward, B.backward, B.step, A.backward, [A.forward, A.backward], A.step
    _forward(server, "a", a_seeds[0])
    _full_step(server, "b", [30])
    a_input_grads = [_backward(server, "a", a_seeds[0])]
    for seed in a_seeds[1:]:
        _forward(server, "a", seed)
        a_input_grads.append(_backward(server, "a", seed))
    result = _step(server, "a", sq=0.25)

    # Assert: A's replies and its trunk gradient are those at W0; the commit applied them after B's step
    for reply, expected in zip(a_input_grads, inputs_w0, strict=True):
        got = torch.frombuffer(bytearray(reply.grad.data), dtype=torch.float32).view(B, T, H)
        assert torch.equal(got, expected)
    reference = _server(trunk0, "step")
    _full_step(reference, "b", [30])
    grads_w1, _ = _reference_grads(reference.trunk, a_seeds)
    assert not all(torch.allclose(g0, g1) for g0, g1 in zip(grads_w0, grads_w1, strict=True))  # staleness shows
    for param, grad in zip(reference.params, grads_w0, strict=True):
        param.grad = grad.clone()
    expected = commit_step(reference, 0.25)
    assert expected.server_step == 2
    assert result.SerializeToString() == expected.SerializeToString()
    _assert_same_state(server, reference)
    assert server.passes.staleness == {0: 1, 1: 1}


def test_pass_keeps_other_clients_going_where_step_makes_them_wait(trunk0):
    step, passed = _server(trunk0, "step"), _server(trunk0, "pass")
    step.lease_timeout_s = 0.1
    _forward(step, "a", 1)
    _forward(passed, "a", 1)

    with pytest.raises(ProtocolError, match="trunk busy with client a"):
        _forward(step, "b", 2)
    assert pb.OptimizerResult.FromString(_full_step(passed, "b", [2])[-1]).server_step == 1
    assert passed.passes.in_flight() == ["a"]


def test_a_dropped_client_leaves_no_trace(trunk0):
    # Arrange: A has accumulated a gradient and has a graph pending; B is mid-step
    server, reference = _server(trunk0, "pass"), _server(trunk0, "step")
    _forward(server, "a", 1)
    _backward(server, "a", 1)
    _forward(server, "a", 2)
    _forward(server, "b", 3)

    # Act: A drops; B finishes its step
    assert server.abort("a") is True
    _backward(server, "b", 3)
    result = _step(server, "b")

    # Assert: exactly B's step alone; A's buffer and graph are gone
    assert result.SerializeToString() == _full_step(reference, "b", [3])[-1]
    _assert_same_state(server, reference)
    assert server.abort("a") is False and server.passes.in_flight() == []
    with pytest.raises(ProtocolError, match="OPTIMIZER_STEP without accumulated gradients"):
        _step(server, "a")
    with pytest.raises(ProtocolError, match="BACKWARD without a training FORWARD"):
        _backward(server, "a", 2)


def test_a_refused_step_rolls_back_that_client_only(trunk0):
    # Arrange: no magnitude limit; A's gradient overflows the trunk's (issue 7's attack) while B is mid-step
    server = TrunkServer(copy.deepcopy(trunk0), CFG, total_steps=12, lease="pass", max_abs=float("inf"))
    reference = _server(trunk0, "step")
    _forward(server, "a", 1)
    server.handle("a", pb.BACKWARD, 1, 0, pb.Backward(grad=encode_tensor(torch.full((B, T, H), 3e38))))
    _forward(server, "b", 2)
    _backward(server, "b", 2)
    before = [p.detach().clone() for p in server.params]

    # Act / Assert: A's step is refused and its buffer gone; B's step is exactly B's step alone
    with pytest.raises(ProtocolError, match="OPTIMIZER_STEP refused, the trunk is unchanged: .*not finite"):
        _step(server, "a")
    with pytest.raises(ProtocolError, match="OPTIMIZER_STEP without accumulated gradients"):
        _step(server, "a")
    assert all(torch.equal(p, q) for p, q in zip(server.params, before, strict=True)) and server.steps_taken == 0
    _step(server, "b")

    _full_step(reference, "b", [2])
    _assert_same_state(server, reference)


@pytest.mark.parametrize("lease", ["step", "pass"])
def test_checks_hold_in_both_leases(trunk0, lease):
    server = _server(trunk0, lease)
    with pytest.raises(ProtocolError, match="BACKWARD without a training FORWARD"):
        _backward(server, "a", 1)
    _forward(server, "a", 1)
    with pytest.raises(ProtocolError, match="FORWARD again before BACKWARD"):
        _forward(server, "a", 2)
    with pytest.raises(ProtocolError, match=r"Backward.grad: expected shape \(2, 6, 64\)"):
        server.handle("a", pb.BACKWARD, 1, 0, pb.Backward(grad=encode_tensor(torch.ones(1, T, H))))
    _backward(server, "a", 1)  # the malformed BACKWARD left the pending step as it was
    with pytest.raises(ProtocolError, match="client_grad_sq_norm: expected a finite value >= 0"):
        _step(server, "a", sq=-1.0)
    with pytest.raises(ProtocolError, match="OPTIMIZER_STEP without accumulated gradients"):
        _step(server, "a")
    big = pb.Forward(hidden=encode_tensor(torch.full((1, 2, H), 1e6)),
                     attention_mask=encode_tensor(torch.ones(1, 2, dtype=torch.bool)),
                     position_ids=encode_tensor(torch.zeros(1, 2, dtype=torch.int64)), train=True)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        server.handle("b", pb.FORWARD, 1, 0, big)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="server.trunk_lease: expected step or pass, got 'round'"):
        ServerConfig(trunk_lease="round")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass needs mode = sequential, got mode = 'client-batch'"):
        ServerConfig(mode="client-batch", trunk_lease="pass")
    with pytest.raises(ValueError, match="trunk_lease: expected one of step, pass, got 'x'"):
        TrunkServer(build_model()[1].trunk, CFG, total_steps=1, lease="x")
    path = tmp_path / "run.toml"
    path.write_text('[server]\ntrunk_lease = "pass"\n')
    assert RunConfig().server.trunk_lease == "step"
    cfg = load_config(RunConfig, path)
    assert cfg.server.trunk_lease == "pass"
    assert make_trunk_server(cfg, build_model()[1]).passes is not None  # the network recipe passes it on


def _lease_federation(lease: str, **settings):
    def trunk_server(trunk, cfg, steps):
        return TrunkServer(trunk, cfg, total_steps=steps, lease_timeout_s=5.0, lease=lease)

    return make_federation(["a", "b", "c"], num_rounds=2, local_steps=2, trunk_server=trunk_server, **settings)


def _drop_second_forward(session, kind, count):
    """c's first session breaks right after the trunk answered its second FORWARD: a step half done."""
    return session == 1 and kind == pb.FORWARD and count == 2


def test_federation_with_ordered_turns_is_the_same_in_both_leases():
    step = _lease_federation("step").run()
    passed = _lease_federation("pass").run()

    for name, tensor in step.trunk_adapters.items():
        assert torch.equal(passed.trunk_adapters[name], tensor), name
    for name, tensor in step.global_adapters.items():
        assert torch.equal(passed.global_adapters[name], tensor), name


class SlowBeforeBackward:
    """A transport that waits ``delay_s`` before every BACKWARD leaves: the round trip inside a step."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def exchange(self, frame: bytes) -> bytes:
        if pb.Frame.FromString(frame).kind == pb.BACKWARD:
            time.sleep(self.delay_s)
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


def test_semi_sync_rounds_with_pass_lease_serve_others_during_a_slow_round_trip():
    # Arrange: turns off (semi_sync); "a" waits 0.4 s between each FORWARD and its BACKWARD
    fed = _lease_federation("pass", ordered_steps=False)
    fast_connect = fed.connector("a")

    def slow_connect():
        channel = fast_connect()
        channel.transport = SlowBeforeBackward(channel.transport, 0.4)
        return channel

    fed.runners["a"].connect = slow_connect

    # Act
    result = fed.run()

    # Assert: every step of every client committed; b and c committed while a's steps were in flight
    assert [r["clients"] for r in result.history] == [["a", "b", "c"], ["a", "b", "c"]]
    trunk = fed.coordinator.trunk
    assert trunk.steps_taken == 2 * 2 * 3 and sum(trunk.passes.staleness.values()) == 12
    assert max(trunk.passes.staleness) >= 1 and trunk.passes.in_flight() == []


def test_prefix_tuned_trunk_runs_its_snapshot_too(tiny_llama):
    # Arrange: P-tuning v2 prefixes (ParameterDicts) are the trunk's trainable tensors
    model, _ = tiny_llama
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, 3, seed=0)
    step, passed = _server(parts.trunk, "step"), _server(parts.trunk, "pass")

    # Act: b's step interleaves a's in "pass" only
    replies = {lease: _full_step(server, "b", [1]) for lease, server in (("step", step), ("pass", passed))}
    _forward(passed, "a", 2)
    _full_step(passed, "b", [3])
    _backward(passed, "a", 2)
    _step(passed, "a")

    # Assert: equal while not interleaved; the interleaved step did not touch the live prefixes' graph
    assert replies["step"] == replies["pass"]
    assert passed.steps_taken == 3 and passed.passes.staleness == {0: 2, 1: 1}


def test_a_client_dropping_mid_step_is_handled_the_same_in_both_leases():
    # Arrange: ordered turns (sync rounds); c drops mid-step in round 1 and is readmitted in round 2
    runs = {lease: _lease_federation(lease, min_clients=2, drops={"c": _drop_second_forward}) for lease in LEASES}

    # Act
    results = {lease: fed.run() for lease, fed in runs.items()}

    # Assert: the same rounds, the same trunk, the same aggregate, bit for bit
    assert [(r["clients"], r["failures"]) for r in results["pass"].history] == [
        (["a", "b"], ["c"]), (["a", "b", "c"], [])]
    assert runs["pass"].coordinator.trunk.steps_taken == runs["step"].coordinator.trunk.steps_taken == 11
    for name in ("trunk_adapters", "global_adapters"):
        for key, tensor in getattr(results["step"], name).items():
            assert torch.equal(getattr(results["pass"], name)[key], tensor), key


def test_semi_sync_with_a_drop_checkpoints_committed_steps_only(tmp_path):
    # Arrange: turns off; a slow round trip for a, so steps interleave; c drops mid-step in round 1
    fed = _lease_federation("pass", min_clients=2, drops={"c": _drop_second_forward}, ordered_steps=False,
                            checkpoint_dir=tmp_path)
    fast_connect = fed.connector("a")

    def slow_connect():
        channel = fast_connect()
        channel.transport = SlowBeforeBackward(channel.transport, 0.1)
        return channel

    fed.runners["a"].connect = slow_connect

    # Act
    result = fed.run()

    # Assert: c's half step left nothing; the last checkpoint is the final trunk with its 11 committed steps
    trunk = fed.coordinator.trunk
    assert result.history[0]["failures"] == ["c"] and result.history[1]["clients"] == ["a", "b", "c"]
    assert trunk.steps_taken == 11 and sum(trunk.passes.staleness.values()) == 11
    assert trunk.passes.in_flight() == []
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    assert saved.trunk.steps_taken == 11
    for key, tensor in result.trunk_adapters.items():
        assert torch.equal(saved.trunk.adapters[key], tensor), key
