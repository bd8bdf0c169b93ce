"""Cutting large frames into gRPC-sized chunks and putting them back together.

FL-GLM (arXiv 2406.14898) ships hidden states and their gradients between client and server on
every step; a (B, T, H) activation easily exceeds one gRPC message. A frame whose serialized size
exceeds ``max_message_bytes`` is therefore sent as ``chunk_count`` Frames that share the header
(protocol version, kind, round, step, seq) and carry consecutive slices of the (already sealed)
body. The receiver accepts chunks strictly in order, checks that every chunk repeats the header of
the first, and refuses a frame whose body grows beyond its hard cap, before buffering it.
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
        raise ProtocolError(f"{kind_name(frame.kind)} frame is already a chunk ({frame.chunk_index}/{frame.chunk_count})")
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
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a chunked frame is partly received."""
        return self._header is not None

    def add(self, message: bytes) -> bytes | None:
        frame = _parse(message)
        if frame.chunk_count <= 1:
            return self._whole(frame, message)
        self._check_chunk(frame)
        self._size += len(frame.body)
        if self._size > self.max_frame_bytes:
            raise ProtocolError(
                f"chunked {kind_name(frame.kind)} frame exceeds the limit of {self.max_frame_bytes} bytes "
                f"after chunk {frame.chunk_index + 1} of {frame.chunk_count}",
                code=pb.RESOURCE_EXHAUSTED,
            )
        self._parts.append(frame.body)
        if frame.chunk_index + 1 < frame.chunk_count:
            return None
        return self._finish(frame)

    def _whole(self, frame: pb.Frame, message: bytes) -> bytes:
        if self.pending:
            raise ProtocolError(
                f"unchunked {kind_name(frame.kind)} frame arrived after chunk {len(self._parts)} of {self._count}"
            )
        if frame.chunk_index != 0:
            raise ProtocolError(f"unchunked frame has chunk_index {frame.chunk_index}")
        if len(message) > self.max_frame_bytes:
            raise ProtocolError(
                f"{kind_name(frame.kind)} frame of {len(message)} bytes exceeds the limit of {self.max_frame_bytes}",
                code=pb.RESOURCE_EXHAUSTED,
            )
        return message

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
        if frame.chunk_index != len(self._parts):
            raise ProtocolError(
                f"chunk {frame.chunk_index} of {kind_name(frame.kind)} arrived out of order, expected {len(self._parts)}"
            )

    def _finish(self, frame: pb.Frame) -> bytes:
        body = b"".join(self._parts)
        self._reset()
        whole = pb.Frame(
            protocol_version=frame.protocol_version,
            kind=frame.kind,
            round=frame.round,
            step=frame.step,
            seq=frame.seq,
            body=body,
        )
        return whole.SerializeToString()
