"""Hybrid encrypted/plaintext aggregation: encrypt what is sensitive, send the rest in the clear.

The hybrid scheme of arXiv 2503.12226 (privacy-preserving cross-cloud training) protects only the
parameters whose updates leak the most and aggregates the others in plaintext, trading a small loss
of protection for most of the cost of encryption. Here a `HybridPolicy` maps tensor names (PEFT
state-dict keys ``"head/..."``, ``"tail/..."``, see `fedsplit.strategy.base.ClientUpdate`) to
``"plain"``, ``"secagg"`` or ``"ckks"`` by fnmatch patterns, first match wins.

* `default_policy`: the head adapters (closest to the raw tokens: the key to inverting a client's
  hidden states) and the tail's last block (closest to the labels) are encrypted, the rest is plain.
* `sensitivity_policy`: rank tensors by a *measured* sensitivity and encrypt the top fraction of the
  parameters. The measure (`update_sensitivity`) is the RMS of each tensor's last *global* update
  (the difference of the two last aggregates): it is public, so every client derives the same
  partition and ranking leaks nothing new, and update magnitude is what gradient-inversion attacks
  exploit (a tensor that moves more carries more information about the batch that moved it).

Threat model: plaintext tensors are seen individually by the server, exactly as in ``mode = "plain"``;
the encrypted ones get the guarantees of their mode. Choosing what to encrypt is a judgement of
which parameters leak; it is not a proof that the plaintext ones do not.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MODES", "HybridPolicy", "default_policy", "sensitivity_policy", "update_sensitivity"]

MODES = ("plain", "secagg", "ckks")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class HybridPolicy:
    """``rules``: ``(fnmatch pattern, mode)`` pairs, first match wins; names matching none get ``default``."""

    rules: tuple[tuple[str, str], ...]
    default: str = "plain"

    def __post_init__(self) -> None:
        for pattern, mode in self.rules:
            if mode not in MODES:
                raise ValueError(f"policy rule {pattern!r}: expected mode plain, secagg or ckks, got {mode!r}")
        if self.default not in MODES:
            raise ValueError(f"policy default: expected plain, secagg or ckks, got {self.default!r}")

    def mode_of(self, name: str) -> str:
        for pattern, mode in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return mode
        return self.default

    def partition(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Names by mode (sorted; modes with no tensor are left out)."""
        out: dict[str, list[str]] = {}
        for name in sorted(names):
            out.setdefault(self.mode_of(name), []).append(name)
        return out


def default_policy(names: Iterable[str], encrypted: str = "secagg") -> HybridPolicy:
    """Encrypt ``head/*`` and the tail's last block (highest ``layers.N`` index under ``tail/``)."""
    tail_layers = [int(m.group(1)) for n in names if n.startswith("tail/") and (m := _LAYER.search(n))]
    rules = [("head/*", encrypted)]
    if tail_layers:
        rules.append((f"tail/*.layers.{max(tail_layers)}.*", encrypted))
    return HybridPolicy(rules=tuple(rules), default="plain")


def update_sensitivity(previous: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> dict[str, float]:
    """Per tensor, the RMS of the global update ``current - previous`` (public: both are global parts)."""
    out = {}
    for name, tensor in current.items():
        delta = tensor.detach().to(torch.float64) - previous[name].detach().to(torch.float64)
        out[name] = float(delta.pow(2).mean().sqrt()) if delta.numel() else 0.0
    return out


def sensitivity_policy(
    sensitivity: Mapping[str, float], sizes: Mapping[str, int], fraction: float, encrypted: str = "secagg"
) -> HybridPolicy:
    """Encrypt the most sensitive tensors, in decreasing order, up to ``fraction`` of all parameters (>= 1 tensor)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected 0 < fraction <= 1, got {fraction}")
    if set(sensitivity) != set(sizes):
        raise ValueError("sensitivity and sizes: expected the same tensor names")
    budget = fraction * sum(sizes.values())
    ranked = sorted(sensitivity, key=lambda n: (-sensitivity[n], n))
    chosen: list[str] = []
    used = 0
    for name in ranked:
        if chosen and used + sizes[name] > budget + 1e-9 * budget:
            continue  # smaller, less sensitive tensors may still fit
        if not math.isfinite(sensitivity[name]):
            raise ValueError(f"sensitivity[{name!r}]: expected a finite number, got {sensitivity[name]}")
        chosen.append(name)
        used += sizes[name]
    return HybridPolicy(rules=tuple((_escape(name), encrypted) for name in chosen), default="plain")


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` ([, ], *, ? escaped)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)
