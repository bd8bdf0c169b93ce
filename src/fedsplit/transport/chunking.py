"""Cutting large frames into gRPC-sized chunks and putting them back together.

FL-GLM (arXiv 2406.14898) ships hidden states and their gradients between client and server on
every step; a (B, T, H) activation easily exceeds one gRPC message. A frame whose serialized size
exceeds ``max_message_bytes`` is therefore sent as ``chunk_count`` Frames that share the header
(protocol version, kind, round, step, seq) and carry consecutive slices of the (already sealed)
body. The receiver accepts chunks strictly in order, checks that every chunk repeats the header of
the first, and refuses a frame whose body grows beyond its hard cap, before buffering it.

Memory. Every chunk but the last carries the same number of body bytes, so the first chunk tells
the most the frame can hold (``chunk_count x piece``): a frame that could exceed the cap is refused
at its first chunk, and the body is copied chunk by chunk into ONE buffer allocated then.
:meth:`Reassembler.add_parts` hands that buffer on as it is (no join, no re-serialization), and the
sealer decrypts it in place, so a frame costs about its own size once, plus a chunk.
"""

from __future__ import annotations

import math

from google.protobuf.message import DecodeError

from fedsplit.protocol import ProtocolError, kind_name, pb

__all__ = [
    "HEADER_ROOM",
    "MIN_MESSAGE_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "split_frame",
    "Reassembler",
    "check_sizes",
]

# Largest possible serialized Frame without its body bytes: seven varint fields of at most
# 10 bytes each plus their tags, and the body's tag and length. 64 bytes would do; keep margin.
HEADER_ROOM = 128
MIN_MESSAGE_BYTES = 4 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024 * 1024  # a (8, 2048, 16384) fp32 activation is 1 GiB


def check_sizes(max_message_bytes: int, max_frame_bytes: int) -> None:
    """Reject size limits that cannot work together."""
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES}, got {max_message_bytes}")
    if max_frame_bytes < max_message_bytes:
        raise ValueError(
            f"max_frame_bytes ({max_frame_bytes}) must be at least max_message_bytes ({max_message_bytes})"
        )


def _parse(message: bytes) -> pb.Frame:
    frame = pb.Frame()
    try:
        frame.ParseFromString(message)
    except DecodeError as exc:
        raise ProtocolError(f"malformed frame ({exc})") from None
    return frame


def _header(frame: pb.Frame) -> tuple[int, int, int, int, int]:
    return (frame.protocol_version, frame.kind, frame.round, frame.step, frame.seq)


def split_frame(message: bytes, max_message_bytes: int) -> list[bytes]:
    """``[message]`` if it fits in one gRPC message, else its chunks, each at most that size."""
    if len(message) <= max_message_bytes:
        return [message]
    frame = _parse(message)
    if frame.chunk_count > 1:
        raise ProtocolError(
            f"{kind_name(frame.kind)} frame is already a chunk ({frame.chunk_index}/{frame.chunk_count})"
        )
    piece = max_message_bytes - HEADER_ROOM
    count = math.ceil(len(frame.body) / piece)
    body = memoryview(frame.body)
    chunks = []
    for index in range(count):
        chunk = pb.Frame(
            protocol_version=frame.protocol_version,
            kind=frame.kind,
            round=frame.round,
            step=frame.step,
            seq=frame.seq,
            body=bytes(body[index * piece : (index + 1) * piece]),
            chunk_index=index,
            chunk_count=count,
        ).SerializeToString()
        assert len(chunk) <= max_message_bytes, (len(chunk), max_message_bytes)
        chunks.append(chunk)
    return chunks


class Reassembler:
    """Turns the chunk stream of one direction back into whole frames (bytes).

    ``add`` returns the complete frame once its last chunk arrives, ``None`` before that. Any
    violation raises `ProtocolError` (BAD_REQUEST, or RESOURCE_EXHAUSTED above the cap); the
    stream is then unusable and the caller should end it.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._reset()

    def _reset(self) -> None:
        self._header: tuple[int, int, int, int, int] | None = None
        self._count = 0
        self._received = 0  # chunks so far
        self._piece = 0  # body bytes of every chunk but the last
        self._buffer = bytearray()
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a chunked frame is partly received."""
        return self._header is not None

    def add(self, message: bytes) -> bytes | None:
        """The whole frame as bytes once its last chunk arrived, ``None`` before that."""
        parts = self.add_parts(message)
        if parts is None:
            return None
        header, body = parts
        if not isinstance(body, memoryview):
            return message  # it was never chunked
        header.body = bytes(body)
        return header.SerializeToString()

    def add_parts(self, message: bytes) -> tuple[pb.Frame, bytes | memoryview] | None:
        """The whole frame as (header without body, body) once complete, ``None`` before that.

        For a chunked frame the body is a writable view of the one reassembly buffer.
        """
        frame = _parse(message)
        if frame.chunk_count <= 1:
            self._whole(frame, message)
            return frame, frame.body
        self._check_chunk(frame)
        body = frame.body
        if self._received == 0:
            self._start(frame, len(body))
        elif len(body) > self._piece or (frame.chunk_index + 1 < frame.chunk_count and len(body) != self._piece):
            raise ProtocolError(
                f"chunk {frame.chunk_index} of {kind_name(frame.kind)} carries {len(body)} bytes; every chunk but "
                f"the last must carry {self._piece}, the last at most that"
            )
        self._buffer[self._size : self._size + len(body)] = body
        self._size += len(body)
        self._received += 1
        if frame.chunk_index + 1 < frame.chunk_count:
            return None
        return self._finish(frame)

    def _start(self, frame: pb.Frame, piece: int) -> None:
        """The first chunk: refuse a frame that could outgrow the cap, then allocate its buffer once."""
        most = frame.chunk_count * piece
        if most > self.max_frame_bytes:
            raise ProtocolError(
                f"chunked {kind_name(frame.kind)} frame of up to {frame.chunk_count} x {piece} bytes exceeds the "
                f"limit of {self.max_frame_bytes} bytes",
                code=pb.RESOURCE_EXHAUSTED,
            )
        self._piece = piece
        self._buffer = bytearray(most)

    def _whole(self, frame: pb.Frame, message: bytes) -> None:
        if self.pending:
            raise ProtocolError(
                f"unchunked {kind_name(frame.kind)} frame arrived after chunk {self._received} of {self._count}"
            )
        if frame.chunk_index != 0:
            raise ProtocolError(f"unchunked frame has chunk_index {frame.chunk_index}")
        if len(message) > self.max_frame_bytes:
            raise ProtocolError(
                f"{kind_name(frame.kind)} frame of {len(message)} bytes exceeds the limit of {self.max_frame_bytes}",
                code=pb.RESOURCE_EXHAUSTED,
            )

    def _check_chunk(self, frame: pb.Frame) -> None:
        if not frame.body:
            raise ProtocolError(f"empty chunk {frame.chunk_index} of {kind_name(frame.kind)}")
        if self._header is None:
            if frame.chunk_index != 0:
                raise ProtocolError(f"chunked frame starts at chunk {frame.chunk_index}, expected 0")
            self._header, self._count = _header(frame), frame.chunk_count
            return
        if _header(frame) != self._header or frame.chunk_count != self._count:
            raise ProtocolError(
                f"chunk {frame.chunk_index} (kind, round, step, seq, count = {_header(frame)[1:]}, "
                f"{frame.chunk_count}) does not match its first chunk ({self._header[1:]}, {self._count})"
            )
        if frame.chunk_index != self._received:
            raise ProtocolError(
                f"chunk {frame.chunk_index} of {kind_name(frame.kind)} arrived out of order, expected {self._received}"
            )

    def _finish(self, frame: pb.Frame) -> tuple[pb.Frame, memoryview]:
        buffer, size = self._buffer, self._size
        self._reset()
        header = pb.Frame(
            protocol_version=frame.protocol_version, kind=frame.kind, round=frame.round, step=frame.step, seq=frame.seq
        )
        return header, memoryview(buffer)[:size]
