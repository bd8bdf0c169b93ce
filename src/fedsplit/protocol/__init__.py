"""The wire protocol: protobuf schema (``fedsplit.proto``), tensor codec and message kinds.

Regenerate the Python modules after editing the schema with ``make proto``.
"""

from __future__ import annotations

from fedsplit.protocol import fedsplit_pb2 as pb
from fedsplit.protocol.codec import (
    DTYPES,
    PAYLOADS,
    PROTOCOL_VERSION,
    REPLY_TO,
    ProtocolError,
    decode_named,
    decode_payload,
    decode_tensor,
    encode_named,
    encode_tensor,
    kind_name,
)

__all__ = [
    "DTYPES",
    "PAYLOADS",
    "PROTOCOL_VERSION",
    "REPLY_TO",
    "ProtocolError",
    "decode_named",
    "decode_payload",
    "decode_tensor",
    "encode_named",
    "encode_tensor",
    "kind_name",
    "pb",
]
