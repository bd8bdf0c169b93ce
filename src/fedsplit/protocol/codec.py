"""Tensors and payload messages to bytes and back, with validation of everything that arrives.

A tensor travels as (dtype, shape, raw C-contiguous bytes). Decoding never executes or
unpickles anything: it checks the dtype against an allow-list, the shape against the byte
count and the caller's expectations, and (for floating tensors) that no value is NaN or Inf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from google.protobuf.message import DecodeError, Message

from fedsplit.protocol import fedsplit_pb2 as pb

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Which payload message each frame kind carries, and which reply each request expects.
PAYLOADS: dict[int, type[Message]] = {
    pb.CLIENT_HELLO: pb.ClientHello,
    pb.SERVER_HELLO: pb.ServerHello,
    pb.JOIN_ROUND: pb.JoinRound,
    pb.ROUND_PLAN: pb.RoundPlan,
    pb.CLIENT_UPDATE: pb.ClientUpdate,
    pb.UPDATE_ACK: pb.UpdateAck,
    pb.FORWARD: pb.Forward,
    pb.FORWARD_RESULT: pb.ForwardResult,
    pb.BACKWARD: pb.Backward,
    pb.BACKWARD_RESULT: pb.BackwardResult,
    pb.OPTIMIZER_STEP: pb.OptimizerStep,
    pb.OPTIMIZER_RESULT: pb.OptimizerResult,
    pb.EVAL_REPORT: pb.EvalReport,
    pb.EVAL_ACK: pb.EvalAck,
    pb.ERROR: pb.Error,
    pb.GOODBYE: pb.Goodbye,
    # private aggregation (fedsplit.server.private_round, fedsplit.client.private_update)
    pb.AGG_ADVERTISE: pb.AggAdvertiseKeys,
    pb.AGG_KEYS_BROADCAST: pb.AggKeysBroadcast,
    pb.AGG_SHARE_KEYS: pb.AggShareKeys,
    pb.AGG_SHARES: pb.AggShares,
    pb.AGG_MASKED_INPUT: pb.AggMaskedInput,
    pb.AGG_UNMASK_REQUEST: pb.AggUnmaskRequest,
    pb.AGG_UNMASK_RESPONSE: pb.AggUnmaskResponse,
    pb.AGG_ACK: pb.AggAck,
    pb.AGG_CKKS_ADVERTISE: pb.AggCkksAdvertise,
    pb.AGG_CKKS_KEY: pb.AggCkksKey,
    pb.AGG_CKKS_HOLDER: pb.AggCkksHolder,
    pb.AGG_CKKS_PENDING: pb.AggCkksPending,
    pb.AGG_CKKS_UPLOAD: pb.AggCkksUpload,
    pb.AGG_CKKS_SUM: pb.AggCkksSum,
    pb.AGG_CKKS_DECRYPTED: pb.AggCkksDecrypted,
    # split generation (fedsplit.server.generation, fedsplit.inference.remote)
    pb.GENERATE_PREFILL: pb.GeneratePrefill,
    pb.GENERATE_STEP: pb.GenerateStep,
    pb.GENERATE_RESULT: pb.GenerateResult,
    pb.GENERATE_END: pb.GenerateEnd,
    pb.GENERATE_ENDED: pb.GenerateEnded,
}
REPLY_TO: dict[int, int] = {
    pb.CLIENT_HELLO: pb.SERVER_HELLO,
    pb.JOIN_ROUND: pb.ROUND_PLAN,
    pb.CLIENT_UPDATE: pb.UPDATE_ACK,
    pb.FORWARD: pb.FORWARD_RESULT,
    pb.BACKWARD: pb.BACKWARD_RESULT,
    pb.OPTIMIZER_STEP: pb.OPTIMIZER_RESULT,
    pb.EVAL_REPORT: pb.EVAL_ACK,
    pb.GOODBYE: pb.GOODBYE,
    pb.AGG_ADVERTISE: pb.AGG_KEYS_BROADCAST,
    pb.AGG_SHARE_KEYS: pb.AGG_SHARES,
    pb.AGG_MASKED_INPUT: pb.AGG_UNMASK_REQUEST,
    pb.AGG_UNMASK_RESPONSE: pb.AGG_ACK,
    pb.AGG_CKKS_ADVERTISE: pb.AGG_CKKS_KEY,
    pb.AGG_CKKS_HOLDER: pb.AGG_CKKS_PENDING,
    pb.AGG_CKKS_UPLOAD: pb.AGG_CKKS_SUM,
    pb.AGG_CKKS_DECRYPTED: pb.AGG_ACK,
    pb.GENERATE_PREFILL: pb.GENERATE_RESULT,
    pb.GENERATE_STEP: pb.GENERATE_RESULT,
    pb.GENERATE_END: pb.GENERATE_ENDED,
}


class ProtocolError(ValueError):
    """A message broke the protocol. ``code`` is the :class:`ErrorCode` sent back to the peer."""

    def __init__(self, message: str, code: int = pb.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def kind_name(kind: int) -> str:
    return pb.Kind.Name(kind) if kind in pb.Kind.values() else f"kind {kind}"


def encode_tensor(tensor: torch.Tensor) -> pb.Tensor:
    """Raw bytes of a CPU tensor (one copy)."""
    if tensor.dtype not in _NAMES:
        raise ProtocolError(f"cannot send dtype {tensor.dtype}: allowed are {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.Tensor(dtype=_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def decode_tensor(
    message: pb.Tensor,
    name: str,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Check and rebuild a tensor. ``shape`` entries that are ``None`` match any size."""
    if message.dtype not in DTYPES:
        raise ProtocolError(f"{name}: unknown dtype {message.dtype!r}, expected one of {sorted(DTYPES)}")
    dtype = DTYPES[message.dtype]
    if dtypes is not None and dtype not in dtypes:
        raise ProtocolError(f"{name}: expected dtype {' or '.join(_NAMES[d] for d in dtypes)}, got {message.dtype}")
    dims = list(message.shape)
    if any(d < 0 for d in dims):
        raise ProtocolError(f"{name}: negative dimension in shape {dims}")
    if shape is not None and (
        len(dims) != len(shape) or any(e is not None and e != d for e, d in zip(shape, dims, strict=False))
    ):
        expected = ", ".join("*" if e is None else str(e) for e in shape)
        raise ProtocolError(f"{name}: expected shape ({expected}), got {tuple(dims)}")
    numel = 1
    for d in dims:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(message.data):
        raise ProtocolError(
            f"{name}: shape {tuple(dims)} of {message.dtype} needs {numel * itemsize} bytes, got {len(message.data)}"
        )
    if numel == 0:
        return torch.empty(dims, dtype=dtype)
    tensor = torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(dims)
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ProtocolError(f"{name}: contains NaN or Inf")
    return tensor


def encode_named(tensors: Mapping[str, torch.Tensor]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in tensors.items()]


def decode_named(items: Sequence[pb.NamedTensor], what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for item in items:
        if item.name in out:
            raise ProtocolError(f"{what}: tensor {item.name!r} appears twice")
        out[item.name] = decode_tensor(item.tensor, f"{what}[{item.name}]")
    return out


def decode_payload(kind: int, body: bytes | memoryview) -> Message:
    """Parse a frame body as the message its kind names."""
    if kind not in PAYLOADS:
        raise ProtocolError(f"unknown message kind {kind}")
    message = PAYLOADS[kind]()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise ProtocolError(f"{kind_name(kind)}: malformed body ({exc})") from None
    return message


def expect_kind(message: Message, kind: int) -> None:
    """Internal check that a handler built the message its reply kind names."""
    assert isinstance(message, PAYLOADS[kind]), (type(message).__name__, kind_name(kind))
