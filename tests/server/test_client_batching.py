"""Client batching ("client-batch" mode): one trunk pass per group, each client's result as if alone."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_lora, add_part_adapters, trainable_parameters
from fedsplit.channel import Channel, RemoteError, in_process_channel
from fedsplit.client import SplitClient
from fedsplit.protocol import decode_tensor, encode_tensor, pb
from fedsplit.server.batching import BatchingTrunkServer
from fedsplit.server.packing import pack, scatter, unpack
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.config import TrainConfig

CFG = TrainConfig(lr=1e-2, max_grad_norm=0.05, schedule="constant")  # the clip is active: it couples members
LORA = [LoraSettings(r=2), LoraSettings(r=2), LoraSettings(r=2)]


# -- helpers --------------------------------------------------------------------------------------
def _run_threads(jobs: dict[str, Callable[[], Any]], timeout_s: float = 30.0) -> dict[str, Any]:
    """Run each job in its own thread (as gRPC serves requests); return results or raised exceptions."""
    results: dict[str, Any] = {}

    def run(name: str, job: Callable[[], Any]) -> None:
        try:
            results[name] = job()
        except Exception as exc:  # reported to the test as data
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a client thread hangs"
    return results


def _channel(server: BatchingTrunkServer, client_id: str) -> Channel:
    return in_process_channel(client_id, lambda k, r, s, m: server.handle(client_id, k, r, s, m))[0]


def _inputs(batch: int, seq: int, padding: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, 64, generator=g)  # (B, T, H)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if padding == "right":
        mask[0, seq - 3 :] = False
    if padding == "left":
        mask[-1, :4] = False
    return hidden, mask, positions_from_mask(mask)


def _forward_request(inputs: Sequence[torch.Tensor], train: bool = True) -> pb.Forward:
    hidden, mask, positions = inputs
    return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(mask),
                      position_ids=encode_tensor(positions), train=train)


def _tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _random_trunk(name: str):
    """A tiny model's trunk (blocks 1..4) with LoRA whose A and B are both non-zero (both get gradients)."""
    from fedsplit.models import load_model

    model, _ = load_model(name)
    trunk = split_model(model, 1, 1).trunk
    add_lora(trunk, LoraSettings(r=2))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in trainable_parameters(trunk):
            param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return trunk


def _federation(
    names: Sequence[str], cfg: TrainConfig = CFG, **server_options: Any
) -> tuple[BatchingTrunkServer, dict[str, SplitClient]]:
    """One batching server and a SplitClient per name; same seed, same weights everywhere."""
    from fedsplit.models import load_model

    base, _ = load_model("tiny-llama")
    server_parts = split_model(copy.deepcopy(base), 1, 1)
    add_part_adapters(server_parts, LORA)
    server = BatchingTrunkServer(server_parts.trunk, cfg, total_steps=10, **server_options)
    clients = {}
    for name in names:
        parts = split_model(copy.deepcopy(base), 1, 1)
        add_part_adapters(parts, LORA)
        clients[name] = SplitClient(parts.head, parts.tail, _channel(server, name), cfg, total_steps=10)
    return server, clients


# -- packing --------------------------------------------------------------------------------------
def test_pack_pads_right_with_false_and_zero_and_unpack_inverts_it():
    a = (torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[5, 6]]))
    b = (2 * torch.ones(2, 4, 3), torch.ones(2, 4, dtype=torch.bool), torch.arange(4).expand(2, 4))

    (hidden, mask, positions), spans = pack([a, b])

    assert hidden.shape == (3, 4, 3) and hidden[0, 2:].abs().sum() == 0
    assert mask[0].tolist() == [True, True, False, False] and positions[0].tolist() == [5, 6, 0, 0]
    assert [torch.equal(x, y) for x, y in zip(unpack(hidden, spans), (a[0], b[0]), strict=False)] == [True, True]
    assert torch.equal(scatter(unpack(hidden, spans), spans, hidden), hidden)


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen2"])
def test_batched_forward_and_backward_equal_per_client_results(model_name):
    trunk = _random_trunk(model_name)  # qwen2: blocks 3, 4 use a sliding window of 8 < T
    members = {"a": _inputs(2, 9, "right", 1), "b": _inputs(1, 14, "none", 2), "c": _inputs(3, 11, "left", 3)}
    grads = {cid: torch.randn(x[0].shape, generator=torch.Generator().manual_seed(10 + i))
             for i, (cid, x) in enumerate(members.items())}
    params = trainable_parameters(trunk)
    alone, param_grad_sum = {}, [torch.zeros_like(p) for p in params]
    for cid, (hidden, mask, positions) in members.items():  # each client alone, as the sequential server does
        leaf = hidden.clone().requires_grad_()
        out = trunk(leaf, mask, positions)
        out.backward(grads[cid])
        alone[cid] = (out.detach(), leaf.grad)
        param_grad_sum = [s + p.grad for s, p in zip(param_grad_sum, params, strict=False)]
        trunk.zero_grad(set_to_none=True)
    server = BatchingTrunkServer(trunk, CFG, total_steps=1, window_s=10.0, max_clients=3)
    channels = {cid: _channel(server, cid) for cid in members}

    def step(cid: str) -> tuple[torch.Tensor, torch.Tensor]:
        reply = channels[cid].call(pb.FORWARD, _forward_request(members[cid]))
        back = channels[cid].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(grads[cid])))
        return decode_tensor(reply.hidden, "out"), decode_tensor(back.grad, "grad")

    batched = _run_threads({cid: lambda cid=cid: step(cid) for cid in members})

    assert server.stats.forward_sizes == [3] and server.stats.backwards == 1
    for cid in members:
        assert torch.allclose(batched[cid][0], alone[cid][0], atol=1e-5), f"{cid}: trunk output"
        assert torch.allclose(batched[cid][1], alone[cid][1], atol=1e-5), f"{cid}: input gradient"
    for param, expected in zip(params, param_grad_sum, strict=False):
        assert expected.abs().max() > 1e-3  # every adapter matrix really gets a gradient
        assert torch.allclose(param.grad, expected, atol=1e-5)


# -- training -------------------------------------------------------------------------------------
def test_three_clients_train_concurrently_with_one_trunk_step_per_group_step():
    server, clients = _federation(["a", "b", "c"], window_s=5.0, max_clients=3)
    before = [p.detach().clone() for p in server.params]

    def train(cid: str) -> list[float]:
        return [clients[cid].train_step([_tokens(2, 10 + i, seed=10 * i + ord(cid))]).grad_norm for i in range(3)]

    norms = _run_threads({cid: lambda cid=cid: train(cid) for cid in clients})

    assert server.steps_taken == 3 and server.stats.steps == 3  # not 9: one per group step
    assert server.stats.forward_sizes == [3, 3, 3] and server.stats.partial_steps == 0
    assert norms["a"] == norms["b"] == norms["c"]  # one joint norm, one coefficient for all members
    assert all(c.steps_taken == 3 for c in clients.values())
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(server.params, before, strict=False)) > 1e-4


def test_gradient_accumulation_batches_every_micro_batch_of_one_group_step():
    cfg = TrainConfig(lr=1e-2, grad_accum=2, schedule="constant")
    server, clients = _federation(["a", "b"], cfg, window_s=5.0, max_clients=2)

    def train(cid: str) -> int:
        clients[cid].train_step([_tokens(2, 9, ord(cid)), _tokens(1, 12, ord(cid) + 1)])
        return clients[cid].steps_taken

    steps = _run_threads({cid: lambda cid=cid: train(cid) for cid in clients})

    assert steps == {"a": 1, "b": 1} and server.steps_taken == 1
    assert server.stats.forward_sizes == [2, 2] and server.stats.backwards == 2


def _reference_step(names: Sequence[str], batches: dict[str, dict]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The same step with only ``names`` taking part."""
    server, clients = _federation(names, window_s=5.0, max_clients=len(names))
    norms = _run_threads({cid: lambda cid=cid: clients[cid].train_step([batches[cid]]).grad_norm for cid in names})
    return [p.detach().clone() for p in server.params], norms


def test_member_without_backward_is_dropped_and_the_step_equals_one_without_it():
    batches = {"a": _tokens(2, 10, 1), "b": _tokens(3, 7, 2)}
    server, clients = _federation(["a", "b"], window_s=5.0, max_clients=3, member_timeout_s=1.0)
    silent = _channel(server, "c")

    results = _run_threads({
        **{cid: lambda cid=cid: clients[cid].train_step([batches[cid]]).grad_norm for cid in clients},
        "c": lambda: silent.call(pb.FORWARD, _forward_request(_inputs(2, 12, "none", 3))),  # then nothing
    })
    with pytest.raises(RemoteError, match="ABORTED: BACKWARD: client c was dropped .* no BACKWARD within"):
        silent.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.zeros(2, 12, 64))))
    expected_params, expected_norms = _reference_step(["a", "b"], batches)

    assert server.stats.forward_sizes == [3] and server.stats.partial_steps == 1 and server.steps_taken == 1
    assert results["a"] == pytest.approx(expected_norms["a"], rel=1e-5) and results["b"] == results["a"]
    moved = [float((p.detach() - q).abs().max()) for p, q in zip(server.params, expected_params, strict=True)]
    assert max(moved) <= 1e-5


def test_member_without_commit_is_dropped_and_its_gradient_is_taken_back():
    batches = {"a": _tokens(2, 10, 1), "b": _tokens(3, 7, 2)}
    server, clients = _federation(["a", "b", "c"], window_s=5.0, max_clients=3, member_timeout_s=1.0)

    results = _run_threads(
        {
            **{cid: lambda cid=cid: clients[cid].train_step([batches[cid]]).grad_norm for cid in ("a", "b")},
            "c": lambda: clients["c"].forward_backward(_tokens(2, 12, 3)),  # its gradient reaches the trunk, no commit
        }
    )
    with pytest.raises(RemoteError, match="ABORTED: OPTIMIZER_STEP: client c was dropped .* no next FORWARD or OPTIM"):
        clients["c"].optimizer_step()
    expected_params, expected_norms = _reference_step(["a", "b"], batches)

    assert server.stats.backwards == 1 and server.stats.partial_steps == 1
    assert results["a"] == pytest.approx(expected_norms["a"], rel=1e-5)
    assert (
        max(float((p.detach() - q).abs().max()) for p, q in zip(server.params, expected_params, strict=False)) <= 1e-5
    )


def test_abort_drops_a_member_at_once():
    server = BatchingTrunkServer(
        _random_trunk("tiny-llama"), CFG, total_steps=1, window_s=5.0, max_clients=2, member_timeout_s=600.0
    )
    channels = {cid: _channel(server, cid) for cid in ("a", "b")}
    inputs = {"a": _inputs(1, 6, "none", 1), "b": _inputs(2, 5, "right", 2)}
    _run_threads({cid: lambda cid=cid: channels[cid].call(pb.FORWARD, _forward_request(inputs[cid])) for cid in inputs})

    assert server.abort("b")
    channels["a"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 6, 64))))
    result = channels["a"].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))  # no 600 s wait

    assert result.server_step == 1 and server.stats.partial_steps == 1 and not server.abort("b")
    with pytest.raises(RemoteError, match="ABORTED"):
        channels["b"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(2, 5, 64))))


# -- concurrency ----------------------------------------------------------------------------------
def test_forwards_within_the_window_share_one_trunk_pass_and_one_joint_clip():
    trunk = _random_trunk("tiny-llama")
    server = BatchingTrunkServer(trunk, CFG, total_steps=1, window_s=0.5, max_clients=8)
    channels = {cid: _channel(server, cid) for cid in ("a", "b")}
    inputs, client_sq_norms = {"a": _inputs(1, 8, "none", 1), "b": _inputs(2, 6, "right", 2)}, {"a": 1.0, "b": 4.0}
    reference = copy.deepcopy(trunk)
    for hidden, mask, positions in inputs.values():
        reference(hidden, mask, positions).sum().backward()  # dL/d output = ones, as the clients send below
    trunk_sq_norm = sum(float(p.grad.pow(2).sum()) for p in trainable_parameters(reference))
    start = threading.Barrier(2)

    def step(cid: str) -> pb.OptimizerResult:
        start.wait()
        channels[cid].call(pb.FORWARD, _forward_request(inputs[cid]))
        channels[cid].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(inputs[cid][0].shape))))
        return channels[cid].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=client_sq_norms[cid]))

    results = _run_threads({cid: lambda cid=cid: step(cid) for cid in channels})

    assert server.stats.forward_sizes == [2] and server.steps_taken == 1
    assert results["a"] == results["b"] and results["a"].server_step == 1
    expected = (trunk_sq_norm + 1.0 + 4.0) ** 0.5  # |trunk grad of a + b|^2 + both clients' sq-norms
    assert results["a"].total_grad_norm == pytest.approx(expected, rel=1e-5)
    assert results["a"].clip_coef == pytest.approx(CFG.max_grad_norm / expected, rel=1e-5)


def test_evaluation_is_served_while_a_group_waits_for_its_window():
    server = BatchingTrunkServer(_random_trunk("tiny-llama"), CFG, total_steps=1, window_s=1.0, max_clients=8)
    training, evaluating = _channel(server, "a"), _channel(server, "b")
    inputs = _inputs(1, 5, "none", 1)

    results = _run_threads(
        {
            "train": lambda: training.call(pb.FORWARD, _forward_request(inputs)),
            "eval": lambda: evaluating.call(pb.FORWARD, _forward_request(inputs, train=False)),
        }
    )

    assert decode_tensor(results["train"].hidden, "t").allclose(decode_tensor(results["eval"].hidden, "e"), atol=1e-6)
    assert server.stats.forward_sizes == [1]  # evaluation did not join the group


# -- protocol -------------------------------------------------------------------------------------
def test_requests_out_of_order_or_malformed_are_refused():
    server = BatchingTrunkServer(_random_trunk("tiny-llama"), CFG, total_steps=1, window_s=0.0, max_tokens=64)
    channel = _channel(server, "a")

    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: BACKWARD without a training FORWARD"):
        channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64))))
    with pytest.raises(RemoteError, match="exceed the server limit of 64"):
        channel.call(pb.FORWARD, _forward_request(_inputs(4, 32, "none", 1)))
    channel.call(pb.FORWARD, _forward_request(_inputs(1, 4, "none", 1)))
    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: OPTIMIZER_STEP without accumulated gradients"):
        channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))
    with pytest.raises(RemoteError, match=r"BAD_REQUEST: Backward.grad: expected shape \(1, 4, 64\)"):
        channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 3, 64))))
    with pytest.raises(RemoteError, match="ABORTED: .*bad request"):  # a bad BACKWARD drops the member
        channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64))))


def test_group_step_scales_the_trunk_lr_by_its_members(tiny_llama):
    model, _ = tiny_llama
    _, trunk, _ = split_model(model, 1, 1)
    add_lora(trunk, LoraSettings(r=2))
    server = BatchingTrunkServer(trunk, TrainConfig(lr=1e-3, schedule="constant"), 4, window_s=0.5, max_clients=2)

    def one_step(cid: str) -> None:
        channel, _ = in_process_channel(cid, lambda k, r, s, m: server.handle(cid, k, r, s, m))
        hidden = torch.randn(1, 4, 64)
        forward = pb.Forward(
            hidden=encode_tensor(hidden),
            attention_mask=encode_tensor(torch.ones(1, 4, dtype=torch.bool)),
            position_ids=encode_tensor(torch.arange(4).unsqueeze(0)),
            train=True,
        )
        channel.call(pb.FORWARD, forward)
        channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64))))
        channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))

    threads = [threading.Thread(target=one_step, args=(cid,)) for cid in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert server.stats.forward_sizes == [2]
    assert server.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
