"""Replay protection of the handshake (docs/security.md, 3.2): a freshness window and bounded nonce memory.

A ClientHello carries a timestamp and a random nonce; :class:`ReplayGuard` admits each nonce once
while its timestamp is inside the window, bounded in total and per identity so that neither a
stranger nor one admitted client can fill it for the others.
"""

from __future__ import annotations

import heapq
import math
import threading

from fedsplit.security.errors import ReplayCacheFullError, ReplayedHelloError, StaleHandshakeError

DEFAULT_REPLAY_CACHE_SIZE = 65_536
DEFAULT_REPLAY_PER_CLIENT = 256  # live nonces one identity may hold: a reconnect every 0.25 s for 60 s


class ReplayGuard:
    """Freshness window plus a bounded memory of accepted nonces, safe across threads.

    A hello is fresh if ``high_water - max_skew <= timestamp <= now + max_skew``, where
    ``high_water`` is the latest clock reading seen. Using the high-water mark for the lower bound
    means a wall clock stepping backwards cannot re-open the window for nonces already forgotten.
    Each accepted nonce is remembered until its timestamp leaves the window; if more than
    ``capacity`` nonces are live at once, new hellos are refused (fail closed) instead of
    forgetting a live nonce. One identity may hold at most ``per_identity`` live nonces, so a
    single admitted client cannot fill the cache for the others (it is refused, they are not).
    """

    def __init__(
        self,
        max_skew_s: float,
        capacity: int = DEFAULT_REPLAY_CACHE_SIZE,
        per_identity: int = DEFAULT_REPLAY_PER_CLIENT,
    ) -> None:
        if not (math.isfinite(max_skew_s) and max_skew_s > 0):
            raise ValueError(f"max_skew_s must be a positive number of seconds, got {max_skew_s!r}")
        if capacity < 1:
            raise ValueError(f"replay cache capacity must be at least 1, got {capacity}")
        if not 1 <= per_identity <= capacity:
            raise ValueError(f"replay cache per_identity must be in 1..{capacity}, got {per_identity}")
        self._skew = float(max_skew_s)
        self._capacity = capacity
        self._per_identity = per_identity
        self._lock = threading.Lock()
        self._high_water = -math.inf
        self._expiry: list[tuple[float, bytes, str]] = []  # min-heap of (hello timestamp, nonce, identity)
        self._live: set[bytes] = set()
        self._by_identity: dict[str, int] = {}  # live nonces per identity

    def admit(self, nonce: bytes, timestamp: float, now: float, who: str, identity: str = "") -> None:
        """Accept ``nonce`` once, or raise `StaleHandshakeError` / `ReplayedHelloError` /
        `ReplayCacheFullError` (this identity holds ``per_identity`` live nonces, or all hold
        ``capacity``)."""
        with self._lock:
            self._high_water = max(self._high_water, now)
            self._check_fresh(timestamp, now, who)
            self._forget_expired()
            if nonce in self._live:
                raise ReplayedHelloError(
                    f"hello from {who} reuses nonce {nonce[:8].hex()}...: replayed handshake"
                )
            if self._by_identity.get(identity, 0) >= self._per_identity:
                raise ReplayCacheFullError(
                    f"refusing hello from {who}: it already made {self._per_identity} handshakes inside "
                    f"the {self._skew:.0f}s freshness window; retry later"
                )
            if len(self._live) >= self._capacity:
                raise ReplayCacheFullError(
                    f"refusing hello from {who}: {self._capacity} handshakes already inside the "
                    f"{self._skew:.0f}s freshness window; retry later"
                )
            self._live.add(nonce)
            self._by_identity[identity] = self._by_identity.get(identity, 0) + 1
            heapq.heappush(self._expiry, (timestamp, nonce, identity))

    def _check_fresh(self, timestamp: float, now: float, who: str) -> None:
        if timestamp < self._high_water - self._skew:
            raise StaleHandshakeError(
                f"hello from {who} is stale: timestamp {timestamp:.3f} is "
                f"{self._high_water - timestamp:.1f}s old, limit {self._skew:.0f}s "
                f"(check the client clock, or this is a delayed replay)"
            )
        if timestamp > now + self._skew:
            raise StaleHandshakeError(
                f"hello from {who} is from the future: timestamp {timestamp:.3f} is "
                f"{timestamp - now:.1f}s ahead of the server clock, limit {self._skew:.0f}s"
            )

    def _forget_expired(self) -> None:
        # A nonce whose timestamp is below the floor would be refused as stale anyway.
        floor = self._high_water - self._skew
        while self._expiry and self._expiry[0][0] < floor:
            _, nonce, identity = heapq.heappop(self._expiry)
            self._live.discard(nonce)
            left = self._by_identity[identity] - 1
            if left:
                self._by_identity[identity] = left
            else:
                del self._by_identity[identity]

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def live_for(self, identity: str) -> int:
        """Live nonces of one identity."""
        with self._lock:
            return self._by_identity.get(identity, 0)
