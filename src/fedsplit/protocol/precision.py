"""The precision of what crosses a cut: hidden states and their gradients (``[wire] dtype``).

FL-GLM (arXiv 2406.14898) ships activations and gradients between client and server at every
step; fp32 doubles what bf16 or fp16 needs. Each side computes in its own precision and casts only
at the cut:

    client: h_head (compute dtype) --to_wire--> bf16/fp16 bytes --from_wire--> trunk input (compute dtype)
    server: dL/dh_trunk_in (compute) --to_wire--> bf16/fp16 bytes --from_wire--> dL/dh_head (compute)

A tensor in another dtype than the run's wire dtype is refused (both sides hash ``[wire]`` into
the handshake, so this only meets a peer that broke the protocol). fp16 holds magnitudes up to
65504 only: a value beyond it would silently arrive as ``inf``, so :func:`to_wire` raises
:class:`WireRangeError` instead, naming the tensor and the remedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch

from fedsplit.protocol import fedsplit_pb2 as pb
from fedsplit.protocol.codec import ProtocolError, decode_tensor, encode_tensor

WIRE_DTYPES = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})
_LABELS = {dtype: label for label, dtype in WIRE_DTYPES.items()}
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


class WireRangeError(ValueError):
    """A value does not fit the wire dtype (beyond fp16's range): sending it would give ``inf``.

    Not a :class:`ProtocolError`: the sender's own data is at fault, so a client does not retry it,
    and a server answers the request with this message while it goes on serving the others."""


def wire_dtype(label: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> the torch dtype hidden states and gradients travel in."""
    try:
        return WIRE_DTYPES[label]
    except KeyError:
        raise ValueError(f"wire dtype: expected one of {', '.join(WIRE_DTYPES)}, got {label!r}") from None


def to_wire(tensor: torch.Tensor, dtype: torch.dtype | None, name: str) -> pb.Tensor:
    """``tensor`` cast to the wire dtype and encoded; ``dtype=None`` sends it as it is."""
    if dtype is not None and tensor.dtype != dtype:
        if dtype == torch.float16 and tensor.numel():
            peak = float(tensor.detach().abs().max())
            if peak > FP16_MAX:
                raise WireRangeError(
                    f"{name}: a value of magnitude {peak:.4g} is beyond fp16's range ({FP16_MAX:g}) and would "
                    'arrive as inf; use wire.dtype = "bf16" (fp32\'s range) or "fp32"'
                )
        tensor = tensor.detach().to(dtype)
    return encode_tensor(tensor)


def from_wire(
    message: pb.Tensor, name: str, *, wire: torch.dtype, compute: torch.dtype, shape: Sequence[int | None] | None
) -> torch.Tensor:
    """Decode a hidden state or gradient sent in ``wire`` dtype and cast it to ``compute`` dtype."""
    expected = _name_of(wire)
    if message.dtype != expected:
        label = _LABELS.get(wire, expected)
        raise ProtocolError(
            f"{name}: sent as {message.dtype or 'no dtype'}, but this run's wire.dtype is {label} ({expected}); "
            "both sides must use the run configuration's [wire] section"
        )
    return decode_tensor(message, name, dtypes=(wire,), shape=shape).to(compute)


def _name_of(dtype: torch.dtype) -> str:
    return encode_tensor(torch.empty(0, dtype=dtype)).dtype
