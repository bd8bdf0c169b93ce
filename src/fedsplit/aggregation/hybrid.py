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

__all__ = ["ALL_ENCRYPTED", "MODES", "HybridPolicy", "check_top_fraction", "default_policy", "sensitivity_policy",
           "top_fraction_set", "update_sensitivity"]

MODES = ("plain", "secagg", "ckks")
ALL_ENCRYPTED = "*"  # a round's encrypted set when no global update has been measured yet: every tensor
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


def top_fraction_set(previous: Mapping[str, Tensor], current: Mapping[str, Tensor], fraction: float) -> list[str]:
    """The tensors to encrypt: the top ``fraction`` of parameters, ranked by the global update ``current - previous``.

    Both are global parts (public to every participant), so the set is a deterministic function of the run's
    public state, decided by the server and checked by each client (`check_top_fraction`), never by one client.
    """
    if set(previous) != set(current):
        raise ValueError("previous and current: expected the same tensor names")
    sizes = {name: tensor.numel() for name, tensor in current.items()}
    policy = sensitivity_policy(update_sensitivity(previous, current), sizes, fraction)
    return sorted(policy.partition(current).get("secagg", []))


def check_top_fraction(encrypted: Iterable[str], sizes: Mapping[str, int], fraction: float) -> list[str]:
    """A client's check of the server's encrypted set: existing names, each once, and a greedy top-``fraction`` fill.

    Accepted: every tensor (the rounds before any global update was measured; encrypting more never reveals
    more), or a set the greedy fill of `sensitivity_policy` could have chosen under *some* ranking: at most
    ``fraction`` of the parameters (or a single tensor) and no left-out tensor that would still fit. The ranking
    itself is the server's (from public global parts); a client checks the amount, not the order.
    """
    chosen = list(encrypted)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"encrypted set: expected distinct tensor names, got {len(chosen)} "
                         f"({len(set(chosen))} distinct)")
    unknown = sorted(set(chosen) - set(sizes))
    if unknown:
        raise ValueError(f"encrypted set: names not among this client's tensors: {unknown[:3]}")
    if set(chosen) == set(sizes):
        return sorted(chosen)
    total = sum(sizes.values())
    budget = fraction * total
    used = sum(sizes[n] for n in chosen)
    if len(chosen) > 1 and used > budget + 1e-9 * budget:
        raise ValueError(f"encrypted set: {used} of {total} parameters, expected at most fraction {fraction} "
                         f"({budget:g})")
    fits = sorted(n for n in sizes if n not in set(chosen) and used + sizes[n] <= budget + 1e-9 * budget)
    if fits:
        raise ValueError(f"encrypted set: {used} of {total} parameters leaves out {fits[:3]}, which fit in fraction "
                         f"{fraction} ({budget:g}): the server encrypts less than configured")
    return sorted(chosen)
