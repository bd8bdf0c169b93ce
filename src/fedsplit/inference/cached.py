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
"""

from __future__ import annotations

import torch

from fedsplit.split.parts import SplitPart


class CacheError(ValueError):
    """A cached step does not fit the cache it is applied to."""


class PartCache:
    """The KV cache of one part for one generation request, and the 2-D mask of what it holds."""

    def __init__(self, part: SplitPart) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=part.config)
        self.mask: torch.Tensor | None = None  # (B, L) bool: the padding mask of every cached position

    @property
    def length(self) -> int:
        """Positions cached so far (prompt + generated tokens)."""
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
    """``part.run_blocks`` for new positions ``(B, t, H)`` on top of ``state``'s cache, which it extends."""
    full_mask = state.extend(new_mask)  # (B, L + t)
    masks = part.cache_masks(state.cache, hidden, full_mask, position_ids)  # sized before this call fills it
    return part.run_layers(hidden, masks, position_ids, cache=state.cache)  # (B, t, H)


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
