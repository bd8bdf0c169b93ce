from __future__ import annotations

import pytest
import torch

from fedsplit.channel import Channel, PlainSealer, RemoteError, ServerSession, in_process_channel
from fedsplit.protocol import PROTOCOL_VERSION, ProtocolError, decode_tensor, encode_tensor, pb


def _doubler(kind, round, step, request):
    if kind == pb.FORWARD:
        return pb.ForwardResult(hidden=encode_tensor(decode_tensor(request.hidden, "h") * 2))
    raise ProtocolError("only FORWARD", code=pb.FAILED_PRECONDITION)


def test_request_travels_as_bytes_and_reply_is_typed():
    channel, session = in_process_channel("c1", _doubler)
    hidden = torch.randn(2, 3, 4)

    reply = channel.call(pb.FORWARD, pb.Forward(hidden=encode_tensor(hidden)))

    assert torch.equal(decode_tensor(reply.hidden, "h"), hidden * 2)
    assert channel.stats.bytes_sent > hidden.numel() * 4
    assert session.stats.frames_received == 1


def test_handler_error_reaches_client_and_session_keeps_serving():
    channel, _ = in_process_channel("c1", _doubler)

    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: only FORWARD"):
        channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(torch.ones(1))))
    reply = channel.call(pb.FORWARD, pb.Forward(hidden=encode_tensor(torch.ones(1))))

    assert decode_tensor(reply.hidden, "h").item() == 2.0


def test_handler_crash_becomes_internal_error_not_a_dead_server():
    def crash(*args):
        raise RuntimeError("boom")

    channel, _ = in_process_channel("c1", crash)

    with pytest.raises(RemoteError, match="INTERNAL: RuntimeError: boom"):
        channel.call(pb.FORWARD, pb.Forward())


def test_replayed_frame_is_rejected():
    session = ServerSession("c1", _doubler)
    sealer = PlainSealer()
    frame = pb.Frame(protocol_version=PROTOCOL_VERSION, kind=pb.FORWARD, seq=sealer.seal(pb.FORWARD, 0, 0, b"").seq,
                     body=pb.Forward(hidden=encode_tensor(torch.ones(1))).SerializeToString()).SerializeToString()

    first = pb.Frame.FromString(session.handle(frame))
    second = pb.Frame.FromString(session.handle(frame))

    assert first.kind == pb.FORWARD_RESULT
    assert second.kind == pb.ERROR
    assert "sequence number 1 is not after 1" in pb.Error.FromString(second.body).message


def test_wrong_protocol_version_is_refused():
    session = ServerSession("c1", _doubler)
    frame = pb.Frame(protocol_version=99, kind=pb.FORWARD, seq=1).SerializeToString()

    reply = pb.Frame.FromString(session.handle(frame))

    assert reply.kind == pb.ERROR
    assert "protocol version 99 is not supported" in pb.Error.FromString(reply.body).message


def test_handler_reply_of_the_wrong_type_is_an_internal_error():
    channel, _ = in_process_channel("c1", lambda *a: pb.ForwardResult())

    with pytest.raises(RemoteError, match="handler answered OPTIMIZER_STEP with ForwardResult"):
        channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep())


class _WrongKindTransport:
    def exchange(self, frame: bytes) -> bytes:
        seq = pb.Frame.FromString(frame).seq
        return pb.Frame(protocol_version=PROTOCOL_VERSION, kind=pb.FORWARD_RESULT, seq=seq).SerializeToString()

    def close(self) -> None:
        pass


def test_reply_of_the_wrong_kind_is_a_protocol_error():
    channel = Channel(_WrongKindTransport())

    with pytest.raises(ProtocolError, match="OPTIMIZER_STEP was answered with FORWARD_RESULT"):
        channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep())
