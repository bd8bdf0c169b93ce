"""Packing several clients' requests into one trunk batch, and back (FL-GLM client-batching, arXiv 2406.14898).

Pure functions over tensors, used by :mod:`fedsplit.server.batching`: each member's
``(hidden, mask, positions)`` is right-padded to the group's longest T and the rows stacked
(padding is appended after every real token, so neither causal nor sliding-window attention of a
real token sees it); each member gets back its own rows cut to its own length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Span(NamedTuple):
    """Where one member sits in the group batch: rows ``[start, stop)``, its first ``length`` positions."""

    start: int
    stop: int
    length: int


def pad_right(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 with zeros (False for bool) up to ``length``."""
    out = tensor.new_zeros((tensor.shape[0], length, *tensor.shape[2:]))  # (B, length, ...)
    out[:, : tensor.shape[1]] = tensor
    return out


def pack(parts: Sequence[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], list[Span]]:
    """Right-pad every member's ``(hidden, mask, positions)`` to the longest T and stack the rows."""
    length = max(part[0].shape[1] for part in parts)
    spans, start = [], 0
    for part in parts:
        batch, seq = part[0].shape[:2]
        spans.append(Span(start, start + batch, seq))
        start += batch
    columns = [torch.cat([pad_right(part[k], length) for part in parts]) for k in range(len(parts[0]))]
    return columns, spans  # hidden (N, T*, H), mask (N, T*), positions (N, T*)


def unpack(batch: torch.Tensor, spans: Sequence[Span]) -> list[torch.Tensor]:
    """Each member's rows of ``batch`` (N, T*, ...) cut to its own length: (B_i, T_i, ...)."""
    return [batch[s.start : s.stop, : s.length] for s in spans]


def scatter(pieces: Sequence[torch.Tensor], spans: Sequence[Span], like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack`: zeros shaped ``like`` (N, T*, H) holding each member's piece."""
    out = torch.zeros_like(like)
    for piece, s in zip(pieces, spans, strict=False):
        out[s.start : s.stop, : s.length] = piece
    return out
