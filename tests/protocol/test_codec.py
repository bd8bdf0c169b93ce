from __future__ import annotations

import pytest
import torch

from fedsplit.protocol import (
    ProtocolError,
    decode_named,
    decode_payload,
    decode_tensor,
    encode_named,
    encode_tensor,
    pb,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8])
def test_tensor_round_trips_through_bytes(dtype):
    tensor = (torch.randn(2, 3, 5) * 7).to(dtype)
    wire = encode_tensor(tensor).SerializeToString()

    back = decode_tensor(pb.Tensor.FromString(wire), "x")

    assert back.dtype == dtype and torch.equal(back, tensor)


def test_empty_and_noncontiguous_tensors_round_trip():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(decode_tensor(encode_tensor(t), "t"), t)
    assert decode_tensor(encode_tensor(torch.empty(0, 4)), "e").shape == (0, 4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: setattr(m, "dtype", "object"), "unknown dtype 'object'"),
        (lambda m: m.shape.__setitem__(0, 3), "needs 96 bytes, got 64"),
        (lambda m: m.shape.__setitem__(0, -2), "negative dimension"),
    ],
)
def test_malformed_tensor_is_rejected_naming_the_field(mutate, message):
    msg = encode_tensor(torch.zeros(2, 8))
    mutate(msg)

    with pytest.raises(ProtocolError, match=message) as info:
        decode_tensor(msg, "Forward.hidden")
    assert "Forward.hidden" in str(info.value)


def test_expected_shape_and_dtype_are_enforced():
    msg = encode_tensor(torch.zeros(2, 4, 8))

    with pytest.raises(ProtocolError, match=r"expected shape \(\*, \*, 16\), got \(2, 4, 8\)"):
        decode_tensor(msg, "h", shape=(None, None, 16))
    with pytest.raises(ProtocolError, match="expected dtype bfloat16, got float32"):
        decode_tensor(msg, "h", dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad):
    t = torch.zeros(3)
    t[1] = bad

    with pytest.raises(ProtocolError, match="NaN or Inf"):
        decode_tensor(encode_tensor(t), "grad")


def test_named_tensors_reject_duplicates():
    items = encode_named({"a": torch.ones(1)}) * 2

    with pytest.raises(ProtocolError, match="'a' appears twice"):
        decode_named(items, "ClientUpdate.adapters")


def test_garbage_body_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="FORWARD: malformed body"):
        decode_payload(pb.FORWARD, b"\xff\xff\xff\xff")
