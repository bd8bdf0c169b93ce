"""The trunk server rejects bad requests with clear errors and keeps serving."""

from __future__ import annotations

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_lora
from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.protocol import encode_tensor, pb
from fedsplit.server import TrunkServer
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig


@pytest.fixture
def served(tiny_llama):
    model, _ = tiny_llama
    _, trunk, _ = split_model(model, 1, 1)
    add_lora(trunk, LoraSettings(r=2))
    server = TrunkServer(trunk, TrainConfig(), total_steps=10, max_tokens=64, lease_timeout_s=0.2)
    channels = {
        cid: in_process_channel(cid, lambda k, r, s, m, cid=cid: server.handle(cid, k, r, s, m))[0]
        for cid in ("a", "b")
    }
    return server, channels


def _forward(hidden, mask=None, positions=None, train=True):
    b, t = hidden.shape[:2]
    mask = torch.ones(b, t, dtype=torch.bool) if mask is None else mask
    positions = torch.arange(t).expand(b, t) if positions is None else positions
    return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(mask),
                      position_ids=encode_tensor(positions), train=train)


@pytest.mark.parametrize(
    "request_, match",
    [
        (lambda: _forward(torch.randn(2, 4, 32)), r"expected shape \(\*, \*, 64\), got \(2, 4, 32\)"),
        (lambda: _forward(torch.randn(2, 4, 64, dtype=torch.float64)), "expected dtype float32, got float64"),
        (lambda: _forward(torch.full((2, 4, 64), float("nan"))), "NaN or Inf"),
        (
            lambda: _forward(torch.randn(2, 4, 64), mask=torch.ones(2, 5, dtype=torch.bool)),
            r"attention_mask: expected shape \(2, 4\)",
        ),
        (lambda: _forward(torch.randn(4, 32, 64)), "exceed the server limit of 64"),
    ],
)
def test_bad_forward_is_refused_and_other_clients_are_served(served, request_, match):
    server, channels = served

    with pytest.raises(RemoteError, match=match):
        channels["a"].call(pb.FORWARD, request_())
    reply = channels["b"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64), train=False))

    assert len(reply.hidden.data) == 4 * 64 * 4


def test_backward_without_forward_is_a_protocol_state_error(served):
    _, channels = served

    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: BACKWARD without a training FORWARD"):
        channels["a"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64))))


def test_backward_grad_must_match_forward_shape(served):
    _, channels = served
    channels["a"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))

    with pytest.raises(RemoteError, match=r"Backward.grad: expected shape \(1, 4, 64\)"):
        channels["a"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 3, 64))))


def test_lease_keeps_other_client_out_until_step_or_abort(served):
    server, channels = served
    channels["a"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))

    with pytest.raises(RemoteError, match="ABORTED: trunk busy with client a"):
        channels["b"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    assert server.abort("a")
    channels["b"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))


def test_optimizer_step_rejects_non_finite_norm(served):
    _, channels = served
    channels["a"].call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    channels["a"].call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64))))

    with pytest.raises(RemoteError, match="client_grad_sq_norm: expected a finite value"):
        channels["a"].call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=float("nan")))


@pytest.mark.parametrize("lease", ["step", "pass"])
def test_a_step_with_a_forward_still_pending_is_refused_and_the_step_goes_on(tiny_llama, lease):
    # Arrange: a commits while its second micro-batch's FORWARD waits for its BACKWARD; a step taken
    # then would release the lease and that BACKWARD would land in the next client's step
    model, _ = tiny_llama
    _, trunk, _ = split_model(model, 1, 1)
    add_lora(trunk, LoraSettings(r=2))
    server = TrunkServer(trunk, TrainConfig(), total_steps=10, max_tokens=64, lease_timeout_s=0.2, lease=lease)
    a, b = (in_process_channel(cid, lambda k, r, s, m, cid=cid: server.handle(cid, k, r, s, m))[0] for cid in "ab")
    grad = pb.Backward(grad=encode_tensor(torch.ones(1, 4, 64)))
    a.call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    a.call(pb.BACKWARD, grad)
    a.call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))

    # Act / Assert: refused, nothing committed; the BACKWARD then the step go through as usual
    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: OPTIMIZER_STEP before the BACKWARD"):
        a.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))
    assert server.steps_taken == 0
    a.call(pb.BACKWARD, grad)
    a.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.0))
    assert server.steps_taken == 1
    b.call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
