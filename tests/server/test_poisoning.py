"""An admitted client that sends extreme values cannot poison the trunk (issue 7, item 1).

Today's attack: a training FORWARD, a BACKWARD whose values are all 3.0e38 (finite fp32), then
OPTIMIZER_STEP with a squared norm of 0. Before the fix the global norm overflowed to NaN, the
clip coefficient came out 1.0 and every trunk LoRA tensor became NaN.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_lora
from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.protocol import decode_tensor, encode_tensor, pb
from fedsplit.server import TrunkServer
from fedsplit.server.batching import BatchingTrunkServer
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import NonFiniteStepError, all_finite, guarded_step

HUGE = 3.0e38  # finite in fp32; its square is not


def _trunk(tiny_llama):
    model, _ = tiny_llama
    _, trunk, _ = split_model(model, 1, 1)
    add_lora(trunk, LoraSettings(r=2))
    return trunk


def _channels(server, ids=("evil", "honest")):
    return {cid: in_process_channel(cid, lambda k, r, s, m, cid=cid: server.handle(cid, k, r, s, m))[0] for cid in ids}


def _forward(hidden, train=True):
    b, t = hidden.shape[:2]
    return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(torch.ones(b, t, dtype=torch.bool)),
                      position_ids=encode_tensor(torch.arange(t).expand(b, t)), train=train)


def _honest_step(channel, hidden_size=64):
    reply = channel.call(pb.FORWARD, _forward(torch.randn(1, 4, hidden_size)))
    out = decode_tensor(reply.hidden, "out")
    channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.randn_like(out) * 1e-2)))
    return channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.5))


def _snapshot(server):
    return [p.detach().clone() for p in server.params]


def _unchanged(server, before):
    return all(torch.equal(a, b) for a, b in zip(before, server.params, strict=True))


def test_huge_backward_is_refused_by_the_magnitude_limit(tiny_llama):
    server = TrunkServer(_trunk(tiny_llama), TrainConfig(), total_steps=10)
    ch = _channels(server)
    reply = ch["evil"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))

    with pytest.raises(RemoteError, match=r"Backward.grad: a value of magnitude 3e\+38 exceeds the limit 65504"):
        ch["evil"].call(
            pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.full_like(decode_tensor(reply.hidden, "h"), HUGE)))
        )
    server.abort("evil")
    _honest_step(ch["honest"])

    assert all_finite(server.params, server.optimizer)


def test_huge_forward_is_refused_by_the_magnitude_limit(tiny_llama):
    server = TrunkServer(_trunk(tiny_llama), TrainConfig(), total_steps=10, max_abs=1e4)

    with pytest.raises(RemoteError, match="Forward.hidden: a value of magnitude 3e\\+38 exceeds the limit 10000"):
        _channels(server)["evil"].call(pb.FORWARD, _forward(torch.full((1, 4, 64), HUGE)))


@pytest.mark.parametrize("mode", ["sequential", "client-batch"])
def test_overflowing_step_is_refused_rolled_back_and_the_honest_client_goes_on(tiny_llama, mode):
    # Arrange: no magnitude limit at all, so only the step's own checks stand between the attack and the trunk.
    trunk, cfg = _trunk(tiny_llama), TrainConfig()
    server = (
        TrunkServer(trunk, cfg, total_steps=10, max_abs=float("inf"))
        if mode == "sequential"
        else BatchingTrunkServer(trunk, cfg, total_steps=10, window_s=0.0, max_clients=1, max_abs=float("inf"))
    )
    ch = _channels(server)
    _honest_step(ch["honest"])
    before, steps = _snapshot(server), server.steps_taken

    # Act: the attack of issue 7.
    reply = ch["evil"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    ch["evil"].call(
        pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.full_like(decode_tensor(reply.hidden, "h"), HUGE)))
    )
    with pytest.raises(RemoteError, match="OPTIMIZER_STEP refused, the trunk is unchanged: .*not finite"):
        ch["evil"].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))

    # Assert: nothing was committed, and the honest client steps as before.
    assert _unchanged(server, before) and server.steps_taken == steps
    assert all_finite(server.params, server.optimizer)
    result = _honest_step(ch["honest"])
    assert result.server_step == steps + 1 and all_finite(server.params, server.optimizer)


def test_sequence_longer_than_the_run_allows_is_refused(tiny_llama):
    server = TrunkServer(_trunk(tiny_llama), TrainConfig(max_length=16), total_steps=10)

    with pytest.raises(
        RemoteError, match="RESOURCE_EXHAUSTED: Forward.hidden: sequence length 17 exceeds .*max_length of 16"
    ):
        _channels(server)["evil"].call(pb.FORWARD, _forward(torch.randn(1, 17, 64), train=False))


def test_positions_outside_the_model_are_refused(tiny_llama):
    server = TrunkServer(_trunk(tiny_llama), TrainConfig(), total_steps=10)
    request = _forward(torch.randn(1, 4, 64))
    request.position_ids.CopyFrom(encode_tensor(torch.tensor([[0, 1, -5, 2]])))

    with pytest.raises(RemoteError, match=r"Forward.position_ids: expected values in \[0, \d+\), got \[-5, 2\]"):
        _channels(server)["evil"].call(pb.FORWARD, request)


def test_malformed_backward_keeps_the_pending_step(tiny_llama):
    server = TrunkServer(_trunk(tiny_llama), TrainConfig(), total_steps=10)
    ch = _channels(server)
    reply = ch["honest"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    out = decode_tensor(reply.hidden, "out")

    with pytest.raises(RemoteError, match="Backward.grad: expected shape"):
        ch["honest"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 3, 64))))
    ch["honest"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.zeros_like(out))))  # the retry is served

    assert ch["honest"].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0)).server_step == 1


def test_guarded_step_undoes_a_step_that_leaves_non_finite_values():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()  # a healthy step, so there are moments to protect
    saved = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    param.grad = torch.tensor([1.0, float("inf"), 1.0])

    with pytest.raises(NonFiniteStepError, match="undone"):
        guarded_step(optimizer, [param])

    assert torch.equal(param.detach(), saved[0]) and param.grad is None
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in saved[1].items())


def test_client_refuses_a_clip_coefficient_outside_zero_one(tiny_llama):
    from fedsplit.client import SplitClient

    model, _ = tiny_llama
    head, trunk, tail = split_model(model, 1, 1)
    for part in (head, trunk, tail):
        add_lora(part, LoraSettings(r=2))
    server = TrunkServer(trunk, TrainConfig(), total_steps=10)

    def lying(kind, rnd, step, message):
        reply = server.handle("c", kind, rnd, step, message)
        if kind == pb.OPTIMIZER_STEP:
            reply.clip_coef = float("nan")
        return reply

    channel, _ = in_process_channel("c", lying)
    client = SplitClient(head, tail, channel, TrainConfig(), total_steps=10)
    ids = torch.randint(0, 100, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = [p.detach().clone() for p in client.params]

    with pytest.raises(NonFiniteStepError, match="clip_coef: expected a value in \\[0, 1\\], got nan"):
        client.train_step([batch])

    assert all(torch.equal(a, b) for a, b in zip(before, client.params, strict=True))
    assert all(p.grad is None for p in client.params)


def test_concurrent_attack_and_honest_clients_in_client_batch_mode_leave_the_trunk_finite(tiny_llama):
    server = BatchingTrunkServer(
        _trunk(tiny_llama), TrainConfig(), total_steps=10, window_s=0.05, max_clients=2, max_abs=float("inf")
    )
    ch = _channels(server)
    errors: list[BaseException] = []

    def attack():
        try:
            reply = ch["evil"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
            huge = torch.full_like(decode_tensor(reply.hidden, "h"), HUGE)
            ch["evil"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(huge)))
            ch["evil"].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))
        except RemoteError as exc:
            errors.append(exc)

    def honest():
        try:
            _honest_step(ch["honest"])
        except RemoteError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attack), threading.Thread(target=honest)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors, "the poisoned group step must be refused"
    assert all_finite(server.params, server.optimizer)
    _honest_step(ch["honest"])  # and the trunk serves again
    assert all_finite(server.params, server.optimizer)
