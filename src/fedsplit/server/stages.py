"""Named stages and checked transitions: the one helper behind every state machine of the server.

Each machine (a round, a participant, a client-batch group and member, the hierarchy's gate and
sub-server) names its stages with an ``enum.Enum`` and lists its allowed moves in a table
``{stage: frozenset(next stages)}`` (STYLE rule 5). A move outside the table is a bug in the
server, never a client's fault, and raises :class:`StageError` (or the caller's own error type).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

S = TypeVar("S", bound=enum.Enum)


class StageError(RuntimeError):
    """A stage change the protocol does not allow (a bug in the server, not a client error)."""


def check_transition(
    table: Mapping[S, frozenset[S]], what: str, old: S, new: S, error: type[Exception] = StageError
) -> None:
    """Raise ``error`` unless ``table`` allows ``old -> new``."""
    if new not in table[old]:
        raise error(f"{what}: {old.name} -> {new.name} is not a valid transition")
