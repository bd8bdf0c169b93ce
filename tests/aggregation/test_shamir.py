"""Shamir secret sharing: reconstruction from any t shares, nothing from t - 1."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from fedsplit.aggregation import shamir


def test_any_t_shares_reconstruct() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 9)
        t = rng.randint(1, n)
        secret = os.urandom(32)
        shares = shamir.split(secret, list(range(1, n + 1)), t)
        for subset in itertools.combinations(shares, t):
            assert shamir.combine(list(subset), t) == secret


def test_t_minus_one_shares_are_consistent_with_every_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [3, 5, 8, 13], 3)
    known = shares[:2]  # t - 1 shares
    for _ in range(10):
        candidate = int.from_bytes(os.urandom(32), "big")
        # the polynomial through (0, candidate) and the two known shares has degree t - 1 = 2 and
        # reproduces them: the known shares cannot tell the true secret from the candidate
        through = [(0, candidate)] + [(s.x, s.y) for s in known]
        assert _lagrange(through, 0) == candidate
        for share in known:
            assert _lagrange(through, share.x) == share.y
        third = shamir.Share(x=8, y=_lagrange(through, 8))  # a full sharing of the candidate
        if candidate < 2**256:
            assert shamir.combine(known + [third], 3) == candidate.to_bytes(32, "big")
    assert shamir.combine(shares[:3], 3) == secret


def _lagrange(points: list[tuple[int, int]], x: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * (x - xj) % shamir.PRIME, den * (xi - xj) % shamir.PRIME
        total = (total + yi * num * pow(den, -1, shamir.PRIME)) % shamir.PRIME
    return total


def test_fewer_than_t_shares_refused_and_bytes_round_trip() -> None:
    shares = shamir.split(b"\x01" * 32, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="at least 3"):
        shamir.combine(shares[:2], 3)
    assert shamir.Share.from_bytes(shares[0].to_bytes()) == shares[0]
    with pytest.raises(ValueError, match="bytes"):
        shamir.Share.from_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"x", [1, 1], 1)


def test_full_256_bit_secrets_survive() -> None:
    secret = b"\xff" * 32  # the largest 256-bit value: no folding, no truncation
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine(shares[2:], 3) == secret
