"""The wire dtype: cast on encode, cast back on decode, refuse another dtype, never send inf as fp16."""

from __future__ import annotations

import pytest
import torch

from fedsplit.protocol import ProtocolError, encode_tensor
from fedsplit.protocol.precision import FP16_MAX, WireRangeError, from_wire, to_wire, wire_dtype


@pytest.mark.parametrize("label", ["bf16", "fp16"])
def test_half_precision_halves_the_bytes_and_decodes_to_the_compute_dtype(label):
    hidden = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))

    message = to_wire(hidden, wire_dtype(label), "h")
    back = from_wire(message, "h", wire=wire_dtype(label), compute=torch.float32, shape=(2, 3, 8))

    assert len(message.data) == hidden.numel() * 2
    assert back.dtype == torch.float32
    assert torch.allclose(back, hidden, rtol=1e-2, atol=1e-3) and not torch.equal(back, hidden)


def test_fp32_wire_and_no_wire_dtype_are_lossless():
    hidden = torch.randn(4, 5)

    assert torch.equal(from_wire(to_wire(hidden, torch.float32, "h"), "h", wire=torch.float32,
                                 compute=torch.float32, shape=None), hidden)
    assert to_wire(hidden, None, "h") == encode_tensor(hidden)


def test_fp16_overflow_is_an_error_not_inf():
    hidden = torch.tensor([1.0, -2.0 * FP16_MAX])

    with pytest.raises(WireRangeError, match=r"Forward.hidden: a value of magnitude 1.31e\+05 is beyond fp16's range"):
        to_wire(hidden, torch.float16, "Forward.hidden")
    assert len(to_wire(hidden, torch.bfloat16, "Forward.hidden").data) == 4  # bf16 has fp32's range


def test_another_dtype_than_the_runs_is_refused_by_name():
    message = encode_tensor(torch.zeros(2, 2))

    with pytest.raises(ProtocolError, match=r"Backward.grad: sent as float32, but this run's wire.dtype is bf16"):
        from_wire(message, "Backward.grad", wire=torch.bfloat16, compute=torch.float32, shape=(2, 2))


def test_unknown_label():
    with pytest.raises(ValueError, match="expected one of fp32, bf16, fp16, got 'int8'"):
        wire_dtype("int8")
