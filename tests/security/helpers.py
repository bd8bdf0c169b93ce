"""Small helpers shared by the security tests."""

from __future__ import annotations

from dataclasses import dataclass

T0 = 1_700_000_000.0
RUN_ID = "run-001"


@dataclass
class FakeClock:
    """A wall clock the test moves by hand."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    """``data`` with one bit inverted."""
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)
