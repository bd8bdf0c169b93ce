"""``hidden_noise_std``: the client adds Gaussian noise to every hidden state it sends (training, evaluation)."""

from __future__ import annotations

import pytest
import torch

from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.protocol import decode_tensor, pb
from fedsplit.server import TrunkServer
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.config import TrainConfig

from tiny import build_model, token_batches


def _client(noise: float):
    _, parts = build_model()
    server = TrunkServer(parts.trunk, TrainConfig(), 4)
    sent: list[torch.Tensor] = []

    def handler(kind, rnd, step, message):
        if kind == pb.FORWARD:
            sent.append(decode_tensor(message.hidden, "h"))
        return server.handle("c", kind, rnd, step, message)

    channel, _ = in_process_channel("c", handler)
    return parts, SplitClient(parts.head, parts.tail, channel, TrainConfig(), 4, hidden_noise_std=noise), sent


def test_training_and_evaluation_both_send_noisy_hidden_states():
    torch.manual_seed(0)
    parts, client, sent = _client(noise=0.5)
    batch = token_batches(1, 2, seed=0)[0]
    with torch.no_grad():
        clean = parts.head(batch["input_ids"], batch["attention_mask"], positions_from_mask(batch["attention_mask"]))

    client.train_step([batch])
    with torch.no_grad():  # the step moved the head's LoRA
        clean_after = parts.head(
            batch["input_ids"], batch["attention_mask"], positions_from_mask(batch["attention_mask"])
        )
    client.eval_loss([batch])

    assert (sent[0] - clean).std().item() == pytest.approx(0.5, rel=0.1)
    assert (sent[1] - clean_after).std().item() == pytest.approx(0.5, rel=0.1)  # held-out text is private too


def test_noise_off_sends_exactly_the_head_output():
    parts, client, sent = _client(noise=0.0)
    batch = token_batches(1, 2, seed=0)[0]
    with torch.no_grad():
        clean = parts.head(batch["input_ids"], batch["attention_mask"], positions_from_mask(batch["attention_mask"]))

    client.train_step([batch])

    assert torch.equal(sent[0], clean)


def test_negative_noise_is_refused():
    _, parts = build_model()
    channel, _ = in_process_channel("c", lambda *a: None)

    with pytest.raises(ValueError, match="hidden_noise_std: expected >= 0"):
        SplitClient(parts.head, parts.tail, channel, TrainConfig(), 4, hidden_noise_std=-0.1)
