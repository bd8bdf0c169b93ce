"""One split part run with its own KV cache (FL-GLM, arXiv 2406.14898; FedSEA-LLaMA, arXiv 2505.15683).

Each party keeps the keys and values of its own blocks in a transformers ``DynamicCache``::

    prefill  head: ids (B, T)      -> h1 (B, T, H) --cut 1--> trunk -> h2 (B, T, H) --cut 2--> tail -> logits (B, V)
    step     head: id  (B, 1)      -> h1 (B, 1, H) --cut 1--> trunk -> h2 (B, 1, H) --cut 2--> tail -> logits (B, V)

Only the new positions' hidden states and their position ids cross a cut after the prefill. The
2-D padding mask travels once, with the prefill; every side then extends its own copy by one
real token per step and rebuilds the 4-D mask from it and its cache length with the model's own
``create_causal_mask`` (the mask never travels again). The cache is indexed by the blocks'
global layer numbers (the attention modules know theirs); the blocks a part does not hold stay
empty, so the mask is sized against the part's own first block of each attention kind.

A part with P-tuning v2 prefixes (:mod:`fedsplit.split.prefix`) runs as PEFT's prefix tuning runs
the unsplit model's ``generate``: at the prefill its cache is pre-filled with the ``P`` prefix keys
and values of its blocks (every row the same, not rotated), its 2-D mask starts with ``P`` ones, and
the real tokens' position ids are offset by ``P`` inside the part. The positions that cross a cut
stay un-offset (as in training); each part adds its own ``P``::

    cache  (B, h, P + L, d)   mask (B, P + L) = [1] * P + the prompt's padding mask + one 1 per step
    positions inside the part = positions across the cut + P
"""

from __future__ import annotations

import torch

from fedsplit.split.parts import SplitPart
from fedsplit.split.prefix import part_prefix


class CacheError(ValueError):
    """A cached step does not fit the cache it is applied to."""


def prefix_length(part: SplitPart) -> int:
    """``P``: the prefix positions at the start of the part's cache (0 without P-tuning v2 prefixes)."""
    prefix = part_prefix(part)
    return 0 if prefix is None else prefix.num_virtual_tokens


class PartCache:
    """The KV cache of one part for one generation request, and the 2-D mask of what it holds."""

    def __init__(self, part: SplitPart) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=part.config)
        self.mask: torch.Tensor | None = None  # (B, P + L) bool: the padding mask of every cached position
        self.prefix = prefix_length(part)  # P: the leading prefix positions; the part offsets positions by it

    @property
    def length(self) -> int:
        """Positions cached so far (the ``P`` prefix positions + prompt + generated tokens)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def batch(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def extend(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Append the new positions' 2-D mask ``(B, t)``; returns the mask of everything ``(B, L + t)``."""
        new_mask = new_mask.to(torch.bool)
        if self.mask is not None and new_mask.shape[0] != self.mask.shape[0]:
            raise CacheError(f"expected a batch of {self.mask.shape[0]} (the prefill's), got {new_mask.shape[0]}")
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        return self.mask

    def step_mask(self) -> torch.Tensor:
        """The 2-D mask of one new real token per row ``(B, 1)``."""
        if self.mask is None:
            raise CacheError("a decoding step needs a prefill first")
        return torch.ones(self.batch, 1, dtype=torch.bool)


def run_blocks_cached(part: SplitPart, hidden: torch.Tensor, new_mask: torch.Tensor, position_ids: torch.Tensor,
                      state: PartCache) -> torch.Tensor:
    """``part.run_blocks`` for new positions ``(B, t, H)`` on top of ``state``'s cache, which it extends.

    ``position_ids`` are the un-offset ones that cross the cut; a prefixed part adds its ``P``.
    """
    if state.mask is None and state.prefix:
        prefill_prefixes(part, state, hidden)
    full_mask = state.extend(new_mask)  # (B, P + L + t)
    positions = position_ids + state.prefix  # PEFT offsets the real tokens' positions by P
    masks = part.cache_masks(state.cache, hidden, full_mask, positions)  # sized before this call fills it
    return part.run_layers(hidden, masks, positions, cache=state.cache)  # (B, t, H)


def prefill_prefixes(part: SplitPart, state: PartCache, hidden: torch.Tensor) -> None:
    """Open ``state`` with the part's prefixes: keys/values ``(B, h, P, d)`` of every block, mask ``(B, P)`` ones."""
    prefix = part_prefix(part)
    if prefix is None or prefix.num_virtual_tokens != state.prefix:
        raise CacheError(f"the {type(part).__name__.lower()}'s prefixes changed since its cache was made "
                         f"(expected {state.prefix} prefix positions)")
    batch = hidden.shape[0]
    prefix.fill(state.cache, part.layer_indices, batch, hidden.dtype)  # not rotated, as PEFT's prompt cache
    state.extend(torch.ones(batch, state.prefix, dtype=torch.bool))


def head_cached(head: SplitPart, input_ids: torch.Tensor, new_mask: torch.Tensor, position_ids: torch.Tensor,
                state: PartCache) -> torch.Tensor:
    """Embeddings + head blocks for new tokens ``(B, t)``: the hidden state that crosses cut 1 ``(B, t, H)``."""
    spec = head.spec
    hidden = head.get_submodule(spec.embed)(input_ids)  # (B, t, H)
    if spec.position_embed:
        hidden = hidden + head.get_submodule(spec.position_embed)(position_ids)
    if spec.embed_dropout:
        hidden = head.get_submodule(spec.embed_dropout)(hidden)
    return run_blocks_cached(head, hidden, new_mask, position_ids, state)


def tail_cached(tail: SplitPart, hidden: torch.Tensor, new_mask: torch.Tensor, position_ids: torch.Tensor,
                state: PartCache) -> torch.Tensor:
    """Tail blocks + norm + LM head on new positions: the logits of the last one ``(B, V)``."""
    hidden = run_blocks_cached(tail, hidden, new_mask, position_ids, state)
    last = tail.get_submodule(tail.spec.norm)(hidden[:, -1:])  # (B, 1, H): only the next token is needed
    logits: torch.Tensor = tail.get_submodule(tail.spec.lm_head)(last)[:, -1]  # (B, V)
    return logits
