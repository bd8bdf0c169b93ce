"""Autoregressive generation across the cut, each party keeping its own KV cache (FL-GLM, arXiv 2406.14898).

FL-GLM's code re-runs the whole prefix through head, trunk and tail for every new token.
Here (as FedSEA-LLaMA, arXiv 2505.15683) the client keeps the head's and the tail's KV caches and
the trunk holder keeps the trunk's, so after the prefill one token costs one position per part::

    client                                      trunk holder (in process, or the server)
    prefill: ids, mask (B, T) -> head -> h1 (B, T, H), mask, positions --> trunk (cache) --.
                                        tail (cache) <-- h2 (B, T, H) -------------------'
             logits (B, V) -> next token (sampling.py)
    step:    id (B, 1)   -> head -> h1 (B, 1, H), positions (B, 1) -----> trunk (cache) --.
                                        tail (cache) <-- h2 (B, 1, H) -------------------'

The trunk is reached through a :class:`TrunkLink`: :class:`LocalTrunk` in this process, or
:class:`fedsplit.inference.remote.RemoteTrunk` over the run's sealed gRPC session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedsplit.inference.cached import PartCache, head_cached, prefix_length, run_blocks_cached, tail_cached
from fedsplit.inference.sampling import SamplingSettings, StopText, next_tokens
from fedsplit.split.parts import Head, Tail, Trunk, positions_from_mask


class GenerationError(ValueError):
    """A generation request that cannot be served (prompt too long, bad settings)."""


class TrunkLink(Protocol):
    """The trunk with its own KV cache, for one generation request at a time."""

    def prefill(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        """Start a request: the prompt's hidden states ``(B, T, H)`` -> the trunk's ``(B, T, H)``."""
        ...

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new position ``(B, 1, H)`` on top of the cache -> ``(B, 1, H)``."""
        ...

    def end(self) -> None:
        """Drop the request's cache."""
        ...


class LocalTrunk:
    """A :class:`TrunkLink` to a trunk in this process."""

    def __init__(self, trunk: Trunk) -> None:
        self.trunk = trunk
        self.state: PartCache | None = None
        self.modules: list[nn.Module] = []  # the trunk's modules, listed at each prefill

    def prefill(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        self.state, self.modules = PartCache(self.trunk), all_modules(self.trunk)
        with torch.no_grad(), eval_mode(*self.modules, walk=False):
            return run_blocks_cached(self.trunk, hidden, attention_mask, position_ids, self.state)

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            raise GenerationError("trunk step without a prefill")
        with torch.no_grad(), eval_mode(*self.modules, walk=False):
            return run_blocks_cached(self.trunk, hidden, self.state.step_mask(), position_ids, self.state)

    def end(self) -> None:
        self.state = None


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, walk: bool = True) -> Iterator[None]:
    """Dropout off while generating; the submodules that were training are put back afterwards.

    Flips only the flags that are set (no recursive ``train()`` calls: this runs at every step).
    ``walk=False`` takes ``modules`` as the complete list (:func:`all_modules`, listed once per
    request: walking the trunk's ~340 modules costs about a millisecond a step).
    """
    training = [m for m in (all_modules(*modules) if walk else modules) if m.training]
    _set_training(training, False)
    try:
        yield
    finally:
        _set_training(training, True)


def all_modules(*roots: nn.Module) -> list[nn.Module]:
    """Every module below (and including) ``roots``, for :func:`eval_mode` with ``walk=False``."""
    return [m for root in roots for m in root.modules()]


def _set_training(modules: Sequence[nn.Module], mode: bool) -> None:
    for m in modules:
        # The plain attribute write: nn.Module.__setattr__ first looks the name up among parameters,
        # buffers and submodules (~8 us a module, 2.6 ms a step for a trained trunk's ~340 modules).
        object.__setattr__(m, "training", mode)


def context_length(config: Any) -> int | None:
    """The model's context (learned or trained positions), if its config says."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class Generation:
    """What one generation request produced, per prompt."""

    tokens: list[list[int]]  # generated token ids per prompt (after EOS / stop: none)
    stop_reasons: list[str]  # "eos", "stop", "length" or "context"
    prompt_lengths: list[int] = field(default_factory=list)


def iter_tokens(
    head: Head, tail: Tail, trunk: TrunkLink, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    settings: SamplingSettings, *, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
) -> Generator[torch.Tensor, None, None]:
    """The next token of every prompt ``(B,)``, step by step, for a left-padded batch ``(B, T)``.

    Rows that ended (EOS) get ``pad_token_id``; the iteration ends when all rows ended or after
    ``max_new_tokens`` (fewer when the model's context is reached). The caches live only as long
    as the iteration: closing it early (a stop string) ends the trunk's request too.
    """
    batch, prompt_len = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    max_new = max_new_tokens(head.config, prompt_len, settings, prefix=client_prefix(head, tail))
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    head_state, tail_state = PartCache(head), PartCache(tail)
    done = torch.zeros(batch, dtype=torch.bool)
    positions = positions_from_mask(mask)  # (B, T)
    client_modules = all_modules(head, tail)  # listed once: eval_mode runs at every step
    try:
        with torch.no_grad(), eval_mode(*client_modules, walk=False):
            h1 = head_cached(head, input_ids, mask, positions, head_state)  # (B, T, H) crosses cut 1
            h2 = trunk.prefill(h1, mask, positions, max_new)  # (B, T, H) crosses cut 2
            logits = tail_cached(tail, h2, mask, positions, tail_state)  # (B, V)
        last = positions[:, -1:]  # (B, 1)
        for index in range(max_new):
            token = next_tokens(logits, settings, generator)  # (B,)
            token = torch.where(done, torch.tensor(pad_token_id), token)
            done |= torch.isin(token, eos)
            yield token
            if bool(done.all()) or index == max_new - 1:
                return
            last = last + 1  # (B, 1): the new token's position
            with torch.no_grad(), eval_mode(*client_modules, walk=False):
                step_mask = head_state.step_mask()
                h1 = head_cached(head, token[:, None], step_mask, last, head_state)  # (B, 1, H) crosses cut 1
                h2 = trunk.step(h1, last)  # (B, 1, H) crosses cut 2
                logits = tail_cached(tail, h2, step_mask, last, tail_state)  # (B, V)
    finally:
        trunk.end()


def max_new_tokens(config: Any, prompt_len: int, settings: SamplingSettings, *, prefix: int = 0) -> int:
    """``settings.max_new_tokens``, fewer if the model's context ends first; a prompt filling it is an error.

    ``prefix``: the P-tuning v2 prefix positions, which count in the context (the real tokens'
    positions start at ``P`` and the cache holds ``P + L`` positions).
    """
    limit = context_length(config)
    if limit is None:
        return settings.max_new_tokens
    if prompt_len + prefix >= limit:
        prefixed = f" (+ {prefix} prefix positions)" if prefix else ""
        raise GenerationError(f"the prompt has {prompt_len} tokens{prefixed}; the model's context is {limit} "
                              "(it must leave room for at least one new token)")
    return min(settings.max_new_tokens, limit - prompt_len - prefix)


def client_prefix(head: Head, tail: Tail) -> int:
    """The prefix positions the client's parts put before the prompt (their ``P``; 0 without prefixes)."""
    return max(prefix_length(head), prefix_length(tail))


def generate_ids(
    head: Head, tail: Tail, trunk: TrunkLink, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    settings: SamplingSettings, *, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
) -> Generation:
    """All tokens of :func:`iter_tokens` for a batch of prompts, cut at each row's EOS."""
    steps = list(iter_tokens(head, tail, trunk, input_ids, attention_mask, settings,
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id))
    tokens = torch.stack(steps, dim=1) if steps else torch.empty(len(input_ids), 0, dtype=torch.long)  # (B, n)
    fits = max_new_tokens(head.config, input_ids.shape[1], settings, prefix=client_prefix(head, tail))
    ended = "length" if fits == settings.max_new_tokens else "context"
    rows, reasons = [], []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_token_ids), None)
        rows.append(row if cut is None else row[:cut])
        reasons.append(ended if cut is None else "eos")
    lengths = [int(n) for n in (input_ids.new_ones(input_ids.shape) if attention_mask is None
                                else attention_mask).sum(-1)]
    return Generation(rows, reasons, lengths)


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids of ``prompt``; through the tokenizer's chat template when it has one (``chat=None``) or
    when asked (``chat=True``: an error without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if chat and not template:
        raise GenerationError("chat=True: the tokenizer has no chat template")
    if (chat is None and template) or chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has them
    return list(tokenizer(prompt)["input_ids"])


def eos_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """The end-of-sequence ids: the tokenizer's, and the model's generation config's if given."""
    found = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    extra = getattr(model_config, "eos_token_id", None)
    found += extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
    return tuple(dict.fromkeys(found))


class SplitGenerator:
    """Text in, text out, across the cut: the client's head and tail, a :class:`TrunkLink` to the trunk."""

    def __init__(self, head: Head, tail: Tail, trunk: TrunkLink, tokenizer: Any, *,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        self.head, self.tail, self.trunk, self.tokenizer = head, tail, trunk, tokenizer
        self.eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)

    def stream(self, prompt: str, settings: SamplingSettings | None = None, *,
               chat: bool | None = None) -> Iterator[str]:
        """The answer to ``prompt`` as text pieces, as they are generated (a stop string is never shown)."""
        settings = settings or SamplingSettings()
        ids = torch.tensor([encode_prompt(self.tokenizer, prompt, chat=chat)])  # (1, T)
        generated: list[int] = []
        text = StopText(settings.stop)
        steps = iter_tokens(self.head, self.tail, self.trunk, ids, None, settings, eos_token_ids=self.eos,
                            pad_token_id=self.pad)
        try:
            for token in steps:
                if int(token[0]) in self.eos:
                    break
                generated.append(int(token[0]))
                piece, stopped = text.update(self.decode(generated))
                if piece:
                    yield piece
                if stopped:
                    return
            rest = text.finish(self.decode(generated))
            if rest:
                yield rest
        finally:
            steps.close()  # ends the trunk's request even when the caller stops reading

    def generate(self, prompt: str, settings: SamplingSettings | None = None, *, chat: bool | None = None) -> str:
        """The whole answer to ``prompt``."""
        return "".join(self.stream(prompt, settings, chat=chat))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
