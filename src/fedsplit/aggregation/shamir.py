"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1) (Shamir 1979).

Secure aggregation (Bonawitz et al. 2017, Bell et al. 2020) shares each client's self-mask seed and
pairwise-mask secret key among its neighbours, so that the server can unmask the sum when clients
drop out, as long as ``t`` neighbours answer. 256-bit secrets are field elements directly (the
Mersenne prime ``2^521 - 1`` exceeds ``2^256``), so a secret is never split or folded.

Properties (tested): any ``t`` shares reconstruct the secret; any ``t - 1`` shares are consistent
with *every* secret (for each candidate there is exactly one degree ``t - 1`` polynomial through
the candidate at 0 and the ``t - 1`` shares), so they reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PRIME", "SHARE_BYTES", "Share", "split", "combine", "interpolate_at"]

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian


@dataclass(frozen=True)
class Share:
    """The point ``(x, y)`` of a sharing polynomial; ``x`` in 1..2^32-1, never 0 (0 is the secret)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 0 < self.x < 2**32:
            raise ValueError(f"share x: expected 1..2^32-1, got {self.x}")
        if not 0 <= self.y < PRIME:
            raise ValueError("share y: expected a field element < 2^521 - 1")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 4 + SHARE_BYTES:
            raise ValueError(f"expected a share of {4 + SHARE_BYTES} bytes, got {len(data)}")
        return cls(x=int.from_bytes(data[:4], "big"), y=int.from_bytes(data[4:], "big"))


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Shares of ``secret`` (at most 64 bytes) at the points ``xs``; any ``threshold`` of them reconstruct it."""
    if len(secret) > 64:
        raise ValueError(f"expected a secret of at most 64 bytes, got {len(secret)}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"expected distinct share points, got {list(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold: expected 1..{len(xs)} (the number of shares), got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x=x, y=_evaluate(coefficients, x)) for x in xs]


def combine(shares: Sequence[Share], threshold: int, secret_len: int = 32) -> bytes:
    """The secret from ``threshold`` shares (the first ``threshold`` distinct points are used)."""
    points = list({share.x: share for share in shares}.values())
    if len(points) < threshold:
        raise ValueError(f"expected at least {threshold} shares with distinct points, got {len(points)}")
    value = interpolate_at(points[:threshold], 0)
    if value >= 2 ** (8 * secret_len):
        raise ValueError(f"the shares do not combine to a {secret_len}-byte secret (inconsistent shares)")
    return value.to_bytes(secret_len, "big")


def interpolate_at(points: Sequence[Share], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree ``len(points) - 1`` through ``points`` (Lagrange)."""
    total = 0
    for i, pi in enumerate(points):
        numerator, denominator = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                numerator = numerator * (x - pj.x) % PRIME
                denominator = denominator * (pi.x - pj.x) % PRIME
        total = (total + pi.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % PRIME
    return value
