from __future__ import annotations

import os

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.attacks.hidden import embedding_matrix
from fedsplit.attacks.inversion import nearest_tokens, token_recovery
from fedsplit.attacks.traffic import capture_step, frame_as_hidden
from fedsplit.channel import parse_frame
from fedsplit.protocol import pb
from fedsplit.security.aead import SecureSession
from fedsplit.security.errors import AuthenticationError
from fedsplit.security.wire import Role
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig

from tiny import token_batch


@pytest.fixture
def captured(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings(r=2)] * 3)
    return model, capture_step(parts, token_batch(model.config.vocab_size, batch=4, length=48), TrainConfig())


def test_a_step_is_six_sealed_frames_and_the_server_sees_the_head_output(captured):
    model, step = captured
    kinds = [parse_frame(f).kind for f in step.frames]
    readable = step.server_view[step.keep]

    assert kinds == [
        pb.FORWARD,
        pb.FORWARD_RESULT,
        pb.BACKWARD,
        pb.BACKWARD_RESULT,
        pb.OPTIMIZER_STEP,
        pb.OPTIMIZER_RESULT,
    ]
    assert token_recovery(nearest_tokens(readable, embedding_matrix(model)), step.tokens) > 0.95  # tiny p = 1: readable


def test_sealed_frames_yield_nothing(captured):
    model, step = captured
    vocab = model.config.vocab_size
    plain = step.server_view.numpy().tobytes()

    for frame in step.frames:
        assert plain[:32] not in frame  # no run of the hidden states' bytes is on the wire
        for offset in range(4):
            hidden = frame_as_hidden(frame, tuple(step.server_view.shape), offset)[step.keep]
            assert token_recovery(nearest_tokens(hidden, embedding_matrix(model)), step.tokens) < 5.0 / vocab


def test_a_peer_clients_keys_do_not_open_the_frames(captured):
    _, step = captured
    frame = parse_frame(step.frames[0])
    peer = SecureSession(os.urandom(32), os.urandom(32), "attack-capture", "client-0", Role.SERVER)

    with pytest.raises(AuthenticationError):
        peer.open(frame.kind, frame.round, frame.step, frame.seq, frame.body)


def test_frame_as_hidden_pads_a_short_body_with_zeros():
    frame = pb.Frame(
        protocol_version=pb.PROTOCOL_VERSION_CURRENT, kind=pb.FORWARD, seq=1, body=torch.ones(3).numpy().tobytes()
    ).SerializeToString()

    hidden = frame_as_hidden(frame, (1, 1, 5))

    assert hidden.flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
