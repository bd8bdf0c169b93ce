"""What both gRPC ends of the FL-GLM session stream (arXiv 2406.14898) must agree on.

The stream carries serialized `Frame` bytes as gRPC messages with identity (bytes) serializers,
so a frame is serialized once, by the channel layer. gRPC's own message limits sit just above
``max_message_bytes``: `fedsplit.transport.chunking` keeps every message below it, and gRPC refuses
anything larger (an unchunked oversized frame) with RESOURCE_EXHAUSTED before it is buffered.
"""

from __future__ import annotations

import grpc

from fedsplit.protocol import pb

__all__ = ["SERVICE", "METHOD", "MESSAGE_HEADROOM", "grpc_options", "GRPC_STATUS"]

SERVICE = "fedsplit.v1.FedSplit"
METHOD = f"/{SERVICE}/Session"
MESSAGE_HEADROOM = 1024  # bytes above max_message_bytes that gRPC still lets through

# How a frame-level ProtocolError ends a gRPC stream, when it cannot be answered in a frame.
GRPC_STATUS: dict[int, grpc.StatusCode] = {
    pb.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    pb.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    pb.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    pb.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    pb.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.ABORTED: grpc.StatusCode.ABORTED,
    pb.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    limit = max_message_bytes + MESSAGE_HEADROOM
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
