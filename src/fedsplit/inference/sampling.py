"""Choosing the next token and when to stop: greedy, temperature, top-k / top-p, stop strings.

Pure functions over the last position's logits ``(B, V)``, run on the client (the tail owns the
logits; the server never sees a token). The filters follow transformers' logits warpers
(temperature, then top-k, then top-p keeping at least one token), so a seeded sampled run is
reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens and when to stop. ``temperature = 0`` is greedy decoding."""

    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated at most"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sample from softmax(logits / T)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample within the smallest set of mass >= p (1: all)"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop when the text contains one of these"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise TypeError(f"stop: expected a list of strings, got {type(self.stop).__name__} {self.stop!r}")
        for item in self.stop:
            if not isinstance(item, str):
                raise TypeError(f"stop: expected strings, got {type(item).__name__} {item!r}")
            if not item:
                raise ValueError("stop: expected non-empty strings, got ''")
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = {
            "max_new_tokens": isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
        }
        expected = {"max_new_tokens": "an integer >= 1", "temperature": ">= 0", "top_k": "an integer >= 0",
                    "top_p": "in (0, 1]"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: expected {expected[name]}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``(B, V)`` logits; removed tokens get ``-inf``."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        mass = ordered.softmax(-1).cumsum(-1)  # (B, V)
        drop = mass - ordered.softmax(-1) >= top_p  # the mass before a token already reaches p: never the first
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row ``(B,)`` from the last position's logits ``(B, V)``."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StopText:
    """Turns the growing decoded text into safe-to-show pieces, and finds the stop strings in it.

    A piece is held back while it could still be the start of a stop string (or ends in half a
    UTF-8 character), so a streamed answer never shows a stop string or a broken character.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.shown = 0

    def update(self, text: str) -> tuple[str, bool]:
        """(new text to show, whether a stop string was found) for the whole decoded ``text`` so far."""
        stable = text.rstrip("\ufffd")  # a trailing replacement character may be half a multi-byte one
        hits = [i for i in (stable.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        return self._take(text, len(stable) - self.hold), False

    def finish(self, text: str) -> str:
        """Whatever is left to show when generation ends without a stop string."""
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    @staticmethod
    def cut(text: str, stop: Sequence[str]) -> str:
        """``text`` up to the first stop string it contains."""
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        return text[: min(hits)] if hits else text
