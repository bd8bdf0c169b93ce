"""Tensor layout and fixed-point ring encoding for secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsplit.aggregation.codec import Quantizer, TensorLayout, pack_ring, unpack_ring


def test_layout_round_trip_keeps_shapes_and_dtypes() -> None:
    tensors = {"tail/b": torch.randn(3, 2, dtype=torch.float16), "head/a": torch.randn(4)}
    layout = TensorLayout.of(tensors)
    vector = layout.flatten(tensors)
    back = layout.unflatten(vector)
    assert layout.names == ("head/a", "tail/b") and vector.shape == (10,)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_layout_refuses_other_keys_or_shapes() -> None:
    layout = TensorLayout.of({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        layout.flatten({"a": torch.zeros(3)})


def test_weighted_mean_within_error_bound() -> None:
    rng = np.random.default_rng(0)
    quantizer = Quantizer.for_clients(10, ring_bits=48, clip=4.0, max_weight=4096)
    values = [rng.uniform(-4, 4, 1000) for _ in range(10)]
    weights = [int(w) for w in rng.integers(0, 4097, 10)]
    ring_sum = sum(quantizer.encode(v, w)[0] for v, w in zip(values, weights, strict=True)) & quantizer.modulus_mask
    mean, total = quantizer.decode_mean(ring_sum)
    exact = sum(w * v for v, w in zip(values, weights, strict=True)) / sum(weights)
    assert total == sum(weights)
    assert np.abs(mean - exact).max() <= quantizer.error_bound


def test_no_wrap_around_at_the_extremes() -> None:
    quantizer = Quantizer.for_clients(7, ring_bits=32, clip=2.0, max_weight=100)
    for sign in (1.0, -1.0):
        ring_sum = sum(quantizer.encode(np.full(3, sign * 2.0), 100)[0] for _ in range(7)) & quantizer.modulus_mask
        mean, _ = quantizer.decode_mean(ring_sum)
        assert np.allclose(mean, sign * 2.0)


def test_clipping_is_counted_and_bad_weights_refused() -> None:
    quantizer = Quantizer.for_clients(2, ring_bits=48, clip=1.0, max_weight=10)
    _, clipped = quantizer.encode(np.array([0.5, 3.0, -7.0]), 1)
    assert clipped == 2
    with pytest.raises(ValueError, match="max_weight"):
        quantizer.encode(np.zeros(2), 11)
    with pytest.raises(TypeError, match="int"):
        quantizer.encode(np.zeros(2), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fractional bits"):
        Quantizer.for_clients(1000, ring_bits=24, clip=100.0, max_weight=4096)


@pytest.mark.parametrize("bits", [17, 32, 48, 64])
def test_pack_unpack_ring(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**63, 50, dtype=np.uint64) & np.uint64(2**bits - 1 if bits < 64 else 2**64 - 1)
    data = pack_ring(values, bits)
    assert len(data) == 50 * ((bits + 7) // 8)
    assert np.array_equal(unpack_ring(data, bits, 50), values)
    with pytest.raises(ValueError, match="ring elements"):
        unpack_ring(data[:-1], bits, 50)
