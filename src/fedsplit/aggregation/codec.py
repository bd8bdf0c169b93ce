"""Tensors <-> flat vectors, and fixed-point quantization into the ring Z_{2^k} for secure aggregation.

Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020) sums integers modulo ``2^k``: each client
maps its pre-weighted update to ring elements, masks them, and the server's sum of masked vectors is
the sum of the unmasked ones modulo ``2^k``. This module holds the encoding on both sides:

* `TensorLayout`: the agreed order, shapes and dtypes of the adapter tensors (``"head/..."``,
  ``"tail/..."``), so a state dict becomes one float64 vector and back.
* `Quantizer`: ``q(x) = round(clip(x, -R, R) * 2^f)`` as a two's-complement ring element; a client
  with integer weight ``w`` uploads ``w * q(x) mod 2^k`` and ``w`` itself (the weight is masked too).

Error bound (no clipping): each client's rounding error is at most ``2^-(f+1)`` per element, so the
weighted mean ``sum_i w_i q(x_i) / (2^f sum_i w_i)`` is within ``2^-(f+1)`` of the exact weighted mean
of the (clipped) inputs. Headroom: ``f = k - 2 - ceil(log2(n * max_weight * R))`` keeps
``|sum_i w_i q(x_i)| <= n * max_weight * R * 2^f <= 2^(k-2)``, half the signed range, so the sum of up
to ``n`` clients never wraps around. Inputs beyond ``[-R, R]`` are clipped (counted, not silent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["TensorLayout", "Quantizer", "pack_ring", "unpack_ring", "MIN_FRAC_BITS"]

MIN_FRAC_BITS = 8  # fewer fractional bits than this is a configuration error, not a precision choice


@dataclass(frozen=True)
class TensorLayout:
    """Names, shapes and dtypes of a state dict, in sorted-name order (the order every party uses)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> TensorLayout:
        names = tuple(sorted(tensors))
        if not names:
            raise ValueError("expected at least one tensor, got an empty state dict")
        return cls(
            names=names,
            shapes=tuple(tuple(tensors[n].shape) for n in names),
            dtypes=tuple(tensors[n].dtype for n in names),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def subset(self, names: set[str] | frozenset[str] | list[str]) -> TensorLayout:
        keep = [i for i, name in enumerate(self.names) if name in set(names)]
        return TensorLayout(
            names=tuple(self.names[i] for i in keep),
            shapes=tuple(self.shapes[i] for i in keep),
            dtypes=tuple(self.dtypes[i] for i in keep),
        )

    def flatten(self, tensors: Mapping[str, Tensor]) -> np.ndarray:
        """One float64 vector, tensors in ``names`` order; keys and shapes must match exactly."""
        if set(tensors) != set(self.names):
            missing, extra = sorted(set(self.names) - set(tensors)), sorted(set(tensors) - set(self.names))
            raise ValueError(f"expected the layout's tensors, got missing={missing} extra={extra}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name!r}: expected shape {shape}, got {tuple(tensor.shape)}")
            parts.append(tensor.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy())
        return np.concatenate(parts)  # (numel,)

    def unflatten(self, vector: np.ndarray) -> dict[str, Tensor]:
        """Inverse of `flatten`, cast back to each tensor's dtype."""
        if vector.shape != (self.numel,):
            raise ValueError(f"expected a vector of {self.numel} values, got shape {vector.shape}")
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape, dtype, size in zip(self.names, self.shapes, self.dtypes, self.sizes, strict=True):
            chunk = torch.from_numpy(np.array(vector[offset : offset + size], dtype=np.float64))
            out[name] = chunk.reshape(shape).to(dtype)
            offset += size
        return out


@dataclass(frozen=True)
class Quantizer:
    """Fixed point in ``Z_{2^ring_bits}`` with ``frac_bits`` fractional bits and inputs clipped to ``[-clip, clip]``."""

    ring_bits: int
    frac_bits: int
    clip: float
    max_weight: int

    @classmethod
    def for_clients(cls, num_clients: int, *, ring_bits: int, clip: float, max_weight: int) -> Quantizer:
        """The most precise quantizer whose sum over ``num_clients`` cannot wrap (see module docstring)."""
        if num_clients < 1:
            raise ValueError(f"num_clients: expected >= 1, got {num_clients}")
        if not 16 <= ring_bits <= 64:
            raise ValueError(f"ring_bits: expected 16..64, got {ring_bits}")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip: expected a finite value > 0, got {clip}")
        if max_weight < 1:
            raise ValueError(f"max_weight: expected >= 1, got {max_weight}")
        frac_bits = ring_bits - 2 - math.ceil(math.log2(num_clients * max_weight * clip))
        if frac_bits < MIN_FRAC_BITS:
            raise ValueError(
                f"ring_bits = {ring_bits} leaves {frac_bits} fractional bits for {num_clients} clients with "
                f"max_weight = {max_weight} and clip = {clip}; expected >= {MIN_FRAC_BITS}: raise ring_bits "
                f"or lower clip / max_weight"
            )
        return cls(ring_bits=ring_bits, frac_bits=frac_bits, clip=float(clip), max_weight=int(max_weight))

    @property
    def error_bound(self) -> float:
        """Largest absolute error of one element of the decoded weighted mean (unclipped inputs)."""
        return 2.0 ** -(self.frac_bits + 1)

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.ring_bits) - 1) if self.ring_bits < 64 else np.uint64(2**64 - 1)

    def encode(self, values: np.ndarray, weight: int) -> tuple[np.ndarray, int]:
        """``[w * q(x) ..., w]`` as uint64 ring elements; also returns how many inputs were clipped."""
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
            raise TypeError(f"weight: expected an int (e.g. num_examples), got {type(weight).__name__}")
        if not 0 <= weight <= self.max_weight:
            raise ValueError(f"weight: expected 0..{self.max_weight} (max_weight), got {weight}")
        if not np.isfinite(values).all():
            raise ValueError("expected finite values, got NaN or Inf")
        clipped = int(np.count_nonzero(np.abs(values) > self.clip))
        fixed = np.rint(np.clip(values, -self.clip, self.clip) * 2.0**self.frac_bits).astype(np.int64)
        ring = (fixed * np.int64(weight)).view(np.uint64)  # two's complement = residue mod 2^64
        out = np.empty(values.size + 1, dtype=np.uint64)  # (numel + 1,): the weight is the last element
        out[:-1] = ring
        out[-1] = np.uint64(weight)
        return out & self.modulus_mask, clipped

    def decode_mean(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """The weighted mean from the ring sum ``[sum w q(x) ..., sum w]``, and the summed weight."""
        total = int(ring_sum[-1] & self.modulus_mask)
        if total <= 0:
            raise ValueError(f"expected a summed weight > 0, got {total}")
        signed = self.to_signed(ring_sum[:-1])
        return signed.astype(np.float64) / (2.0**self.frac_bits * total), total

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        """Centered representatives in ``[-2^(k-1), 2^(k-1))`` as int64."""
        values = (ring & self.modulus_mask).astype(np.uint64)
        if self.ring_bits == 64:
            return values.view(np.int64)
        half = np.uint64(1 << (self.ring_bits - 1))
        signed = values.astype(np.int64)
        return np.where(values >= half, signed - np.int64(1 << self.ring_bits), signed)

    @property
    def element_bytes(self) -> int:
        return (self.ring_bits + 7) // 8


def pack_ring(values: np.ndarray, ring_bits: int) -> bytes:
    """Little-endian ``ceil(ring_bits / 8)`` bytes per element (the wire form of a masked vector)."""
    width = (ring_bits + 7) // 8
    raw = np.ascontiguousarray(values.astype("<u8")).view(np.uint8).reshape(-1, 8)  # (m, 8)
    return raw[:, :width].tobytes()


def unpack_ring(data: bytes, ring_bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_ring`; raises ``ValueError`` unless ``data`` holds exactly ``count`` elements."""
    width = (ring_bits + 7) // 8
    if len(data) != width * count:
        raise ValueError(f"expected {count} ring elements of {width} bytes ({width * count} bytes), got {len(data)}")
    raw = np.zeros((count, 8), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(count, width)
    mask = np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else np.uint64(2**64 - 1)
    return raw.view("<u8").reshape(count).astype(np.uint64) & mask
