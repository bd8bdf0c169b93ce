"""A trunk server configured with a half-precision wire: what it accepts, what it answers, what it costs."""

from __future__ import annotations

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.client import SplitClient
from fedsplit.config import RunConfig, WireConfig, run_config_sections
from fedsplit.models import load_model
from fedsplit.protocol import encode_tensor, pb
from fedsplit.protocol.precision import to_wire
from fedsplit.server import TrunkServer
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig


def _pair(wire: torch.dtype | None):
    """A fresh tiny-llama split; client and trunk server joined in process with ``wire``."""
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings(r=2)] * 3, seed=0)
    cfg = TrainConfig(lr=1e-2)
    server = TrunkServer(parts.trunk, cfg, total_steps=4, wire_dtype=wire)
    channel, _ = in_process_channel("c", lambda k, r, s, m: server.handle("c", k, r, s, m))
    return server, channel, SplitClient(parts.head, parts.tail, channel, cfg, total_steps=4, wire_dtype=wire)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _forward(hidden: torch.Tensor) -> pb.Forward:
    b, t = hidden.shape[:2]
    return pb.Forward(hidden=encode_tensor(hidden), attention_mask=encode_tensor(torch.ones(b, t, dtype=torch.bool)),
                      position_ids=encode_tensor(torch.arange(t).expand(b, t)), train=False)


def test_a_bf16_server_refuses_fp32_hidden_states_and_answers_in_bf16():
    _, channel, _ = _pair(torch.bfloat16)

    with pytest.raises(RemoteError, match="Forward.hidden: sent as float32, but this run's wire.dtype is bf16"):
        channel.call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
    reply = channel.call(pb.FORWARD, _forward(torch.randn(1, 4, 64).bfloat16()))

    assert reply.hidden.dtype == "bfloat16" and len(reply.hidden.data) == 4 * 64 * 2


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_half_precision_step_sends_half_the_activation_bytes_and_keeps_the_loss(wire):
    _, full_channel, full = _pair(None)
    _, half_channel, half = _pair(wire)

    losses = [client.train_step([_batch()]).loss for client in (full, half)]
    eval_losses = [client.eval_loss([_batch()]) for client in (full, half)]
    sent = [channel.stats.bytes_sent + channel.stats.bytes_received for channel in (full_channel, half_channel)]

    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert eval_losses[1] == pytest.approx(eval_losses[0], rel=1e-3)
    assert 0.5 < sent[1] / sent[0] < 0.56  # hidden states and gradients dominate; headers and mask stay


def test_trunk_output_beyond_fp16_is_a_clear_error_and_the_server_goes_on():
    server, channel, _ = _pair(torch.float16)
    with torch.no_grad():  # a trunk whose MLP output is far beyond fp16's range (the input is not)
        for name, param in server.trunk.named_parameters():
            if name.endswith("down_proj.weight"):
                param.mul_(1e8)
    hidden = torch.randn(1, 4, 64)

    with pytest.raises(RemoteError, match="ForwardResult.hidden: a value of magnitude .* beyond fp16's range"):
        channel.call(pb.FORWARD, pb.Forward(hidden=to_wire(hidden, torch.float16, "h"),
                                            attention_mask=encode_tensor(torch.ones(1, 4, dtype=torch.bool)),
                                            position_ids=encode_tensor(torch.arange(4)[None]), train=True))
    with pytest.raises(RemoteError, match="beyond fp16's range"):  # evaluation too; the server still answers
        channel.call(pb.FORWARD, _forward(hidden.half()))


def test_wire_is_an_agreed_section_of_the_run_configuration():
    _, tokenizer = load_model("tiny-llama")
    fp32, bf16 = RunConfig(), RunConfig(wire=WireConfig(dtype="bf16"))

    differ = [name for name, digest in run_config_sections(fp32, tokenizer).items()
              if run_config_sections(bf16, tokenizer)[name] != digest]

    assert differ == ["wire"]
    with pytest.raises(ValueError, match="wire.dtype: expected fp32, bf16 or fp16, got 'int8'"):
        WireConfig(dtype="int8")  # type: ignore[arg-type]


def test_the_client_batching_server_speaks_the_wire_dtype_too():
    from fedsplit.server.batching import BatchingTrunkServer

    _, _, sequential = _pair(torch.bfloat16)
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings(r=2)] * 3, seed=0)
    cfg = TrainConfig(lr=1e-2)
    server = BatchingTrunkServer(parts.trunk, cfg, total_steps=4, max_clients=1, wire_dtype=torch.bfloat16)
    channel, _ = in_process_channel("c", lambda k, r, s, m: server.handle("c", k, r, s, m))
    batched = SplitClient(parts.head, parts.tail, channel, cfg, total_steps=4, wire_dtype=torch.bfloat16)

    assert batched.train_step([_batch()]).loss == sequential.train_step([_batch()]).loss
    with pytest.raises(RemoteError, match="sent as float32, but this run's wire.dtype is bf16"):
        channel.call(pb.FORWARD, _forward(torch.randn(1, 4, 64)))
