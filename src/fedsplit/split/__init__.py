"""The cut: head / trunk / tail parts of a causal LM, driven by a per-architecture table."""

from __future__ import annotations

from fedsplit.split.arch import ARCHITECTURES, ArchSpec, UnsupportedArchitectureError, arch_spec
from fedsplit.split.parts import (
    Head,
    SplitError,
    SplitPart,
    SplitParts,
    Tail,
    Trunk,
    num_blocks,
    positions_from_mask,
    split_model,
    validate_cut,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "Head",
    "SplitError",
    "SplitPart",
    "SplitParts",
    "Tail",
    "Trunk",
    "UnsupportedArchitectureError",
    "arch_spec",
    "num_blocks",
    "positions_from_mask",
    "split_model",
    "validate_cut",
]
