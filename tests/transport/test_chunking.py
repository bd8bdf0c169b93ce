"""Chunking: frames above one gRPC message are cut, checked and reassembled exactly."""

from __future__ import annotations

import os

import pytest

from fedsplit.protocol import ProtocolError, pb
from fedsplit.transport.chunking import MIN_MESSAGE_BYTES, Reassembler, check_sizes, split_frame

MAX = MIN_MESSAGE_BYTES


def frame(body: bytes, seq: int = 7) -> bytes:
    return pb.Frame(protocol_version=1, kind=pb.FORWARD, round=3, step=9, seq=seq, body=body).SerializeToString()


def chunk(index: int, count: int, body: bytes = b"x" * 10, seq: int = 7) -> bytes:
    message = pb.Frame(
        protocol_version=1, kind=pb.FORWARD, round=3, step=9, seq=seq, body=body, chunk_index=index, chunk_count=count
    )
    return message.SerializeToString()


def feed(assembler: Reassembler, messages: list[bytes]) -> list[bytes]:
    return [whole for m in messages if (whole := assembler.add(m)) is not None]


def test_small_frame_is_sent_as_is() -> None:
    message = frame(b"abc")
    assert split_frame(message, MAX) == [message]
    assert Reassembler(MAX).add(message) == message


def test_large_frame_roundtrips_through_chunks_of_bounded_size() -> None:
    message = frame(os.urandom(5 * MAX + 123))

    chunks = split_frame(message, MAX)

    assert len(chunks) == 6
    assert all(len(c) <= MAX for c in chunks)
    headers = {(f.kind, f.round, f.step, f.seq, f.chunk_count) for f in map(pb.Frame.FromString, chunks)}
    assert headers == {(pb.FORWARD, 3, 9, 7, 6)}
    assert feed(Reassembler(10 * MAX), chunks) == [message]


def test_reassembler_is_reusable_for_the_next_frame() -> None:
    first, second = frame(os.urandom(3 * MAX), seq=1), frame(os.urandom(2 * MAX), seq=2)
    assembler = Reassembler(10 * MAX)

    assert feed(assembler, split_frame(first, MAX) + split_frame(second, MAX) + [frame(b"s", seq=3)]) == [
        first,
        second,
        frame(b"s", seq=3),
    ]


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([chunk(1, 3)], "starts at chunk 1"),
        ([chunk(0, 3), chunk(2, 3)], "out of order"),
        ([chunk(0, 3), chunk(0, 3)], "out of order"),
        ([chunk(0, 3), chunk(1, 4)], "does not match"),
        ([chunk(0, 3), chunk(1, 3, seq=8)], "does not match"),
        ([chunk(0, 3), frame(b"x")], "after chunk 1 of 3"),
        ([chunk(0, 3, body=b"")], "empty chunk"),
        ([pb.Frame(chunk_index=2, chunk_count=1).SerializeToString()], "chunk_index 2"),
        ([b"\xff\xff\xff"], "malformed"),
    ],
)
def test_broken_chunk_streams_are_bad_requests(messages: list[bytes], words: str) -> None:
    assembler = Reassembler(10 * MAX)

    with pytest.raises(ProtocolError, match=words) as info:
        feed(assembler, messages)

    assert info.value.code == pb.BAD_REQUEST


def test_total_above_the_cap_is_resource_exhausted_before_the_last_chunk() -> None:
    chunks = split_frame(frame(os.urandom(8 * MAX)), MAX)
    assembler = Reassembler(3 * MAX)

    with pytest.raises(ProtocolError, match="exceeds the limit") as info:
        feed(assembler, chunks[:-1])

    assert info.value.code == pb.RESOURCE_EXHAUSTED


def test_unchunked_frame_above_the_cap_is_resource_exhausted() -> None:
    with pytest.raises(ProtocolError) as info:
        Reassembler(100).add(frame(b"x" * 200))
    assert info.value.code == pb.RESOURCE_EXHAUSTED


def test_size_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 4096"):
        check_sizes(100, 10_000)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        check_sizes(8192, 4096)
