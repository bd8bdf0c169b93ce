"""A junk chunked frame costs about its own size once (issue 7, item 4).

Before the fix chunks were collected in a list, joined, wrapped in a new Frame and serialized again
before the sealer copied the body once more: a complete 256 MiB junk frame cost about 4x its
size at peak, and endless chunks grew the server by about 1 GB before the cap cut them.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest

from fedsplit.channel import ServerSession
from fedsplit.protocol import ProtocolError, pb
from fedsplit.security.aead import SecureSession
from fedsplit.security.wire import Role
from fedsplit.transport.chunking import HEADER_ROOM, Reassembler
from fedsplit.transport.handshake import GuardedSealer

MIB = 1 << 20


def _session() -> ServerSession:
    sealer = SecureSession(os.urandom(32), os.urandom(32), "run", "alice", Role.SERVER)
    return ServerSession("alice", lambda *a: pb.ForwardResult(), GuardedSealer(sealer, "alice"))


def _junk_chunks(size: int, max_message: int):
    """The chunks of one FORWARD frame whose sealed body is ``size`` random bytes, made one at a time."""
    piece = max_message - HEADER_ROOM
    count = -(-size // piece)
    for index in range(count):
        body = os.urandom(min(piece, size - index * piece))
        yield pb.Frame(protocol_version=pb.PROTOCOL_VERSION_CURRENT, kind=pb.FORWARD, round=1, step=1, seq=0,
                       body=body, chunk_index=index, chunk_count=count).SerializeToString()


def test_a_junk_frame_within_the_bound_costs_at_most_1_2x_its_size():
    size = 48 * MIB
    session, assembler = _session(), Reassembler(max_frame_bytes=64 * MIB)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        reply = None
        for chunk in _junk_chunks(size, max_message=1 * MIB):
            parts = assembler.add_parts(chunk)
            if parts is not None:
                reply = session.handle_parts(*parts)
            del chunk, parts
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert pb.Frame.FromString(reply).kind == pb.ERROR  # refused at the tag (the error is sealed for the client)
    assert session.sealer.discarded
    assert peak <= 1.2 * size, f"peak {peak / size:.2f}x the frame"


def test_a_frame_that_could_outgrow_the_bound_is_refused_at_its_first_chunk():
    assembler = Reassembler(max_frame_bytes=8 * MIB)
    first = next(_junk_chunks(1024 * MIB, max_message=4 * MIB))  # declares 257 chunks of ~4 MiB

    with pytest.raises(ProtocolError, match=r"up to 257 x \d+ bytes exceeds the limit of 8388608"):
        assembler.add_parts(first)


def test_chunks_must_keep_the_size_of_the_first():
    assembler = Reassembler(max_frame_bytes=64 * MIB)
    chunks = list(_junk_chunks(3 * MIB, max_message=1 * MIB))
    assembler.add_parts(chunks[0])
    short = pb.Frame.FromString(chunks[1])
    short.body = short.body[:10]

    with pytest.raises(ProtocolError, match="every chunk but the last must carry"):
        assembler.add_parts(short.SerializeToString())


def test_a_genuine_chunked_frame_opens_in_place_and_equals_the_sent_one():
    from fedsplit.transport.chunking import split_frame

    keys = os.urandom(32), os.urandom(32)
    client = SecureSession(keys[0], keys[1], "run", "alice", Role.CLIENT)
    server = SecureSession(keys[1], keys[0], "run", "alice", Role.SERVER)
    payload = os.urandom(5 * MIB)
    sealed = client.seal(pb.FORWARD, 1, 1, payload)
    frame = pb.Frame(protocol_version=pb.PROTOCOL_VERSION_CURRENT, kind=pb.FORWARD, round=1, step=1, seq=sealed.seq,
                     body=sealed.ciphertext).SerializeToString()
    assembler = Reassembler(max_frame_bytes=8 * MIB)

    parts = None
    for chunk in split_frame(frame, 1 * MIB):
        parts = assembler.add_parts(chunk)
    header, body = parts

    assert bytes(server.open(header.kind, header.round, header.step, header.seq, body)) == payload
