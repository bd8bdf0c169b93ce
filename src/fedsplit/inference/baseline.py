"""The baseline split generation keeps no cache: FL-GLM's code re-runs the whole prefix for every token.

For every new token the head, the trunk and the tail run on the whole sequence so far and the
full ``(B, L, H)`` hidden states cross each cut. ``bench/split_inference.py`` measures it
against :func:`fedsplit.inference.generate.iter_tokens`; both give the same greedy tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedsplit.inference.generate import client_prefix, eval_mode, max_new_tokens
from fedsplit.inference.sampling import SamplingSettings, next_tokens
from fedsplit.split.parts import Head, Tail, positions_from_mask

TrunkForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``trunk(hidden (B, L, H), mask (B, L), positions (B, L)) -> (B, L, H)``: in process or an evaluation FORWARD."""


def rerun_step(head: Head, tail: Tail, trunk: TrunkForward, ids: torch.Tensor, *,
               all_logits: bool = True) -> torch.Tensor:
    """The last position's logits ``(1, V)`` with everything re-run over the whole sequence ``(1, L)``.

    FL-GLM's tail computes the logits of every position (``all_logits``); ``all_logits=False`` is
    a stronger baseline that applies the final norm and the LM head to the last position only.
    """
    mask = torch.ones_like(ids, dtype=torch.bool)  # (1, L)
    positions = positions_from_mask(mask)
    with torch.no_grad(), eval_mode(head, tail):
        h1 = head(ids, mask, positions)  # (1, L, H) crosses cut 1, whole
        h2 = trunk(h1, mask, positions)  # (1, L, H) crosses cut 2, whole
        if all_logits:
            return tail(h2, mask, positions)[:, -1]  # (1, V) of (1, L, V)
        last = tail.get_submodule(tail.spec.norm)(tail.run_blocks(h2, mask, positions)[:, -1:])  # (1, 1, H)
        logits: torch.Tensor = tail.get_submodule(tail.spec.lm_head)(last)[:, -1]  # (1, V)
        return logits


def rerun_generate(head: Head, tail: Tail, trunk: TrunkForward, input_ids: torch.Tensor,
                   settings: SamplingSettings, *, eos_token_ids: Sequence[int] = (),
                   all_logits: bool = True) -> list[int]:
    """Tokens for one prompt ``(1, T)``, every step over the whole prefix (no KV cache anywhere)."""
    ids = input_ids
    generator = torch.Generator().manual_seed(settings.seed)
    out: list[int] = []
    for _ in range(max_new_tokens(head.config, ids.shape[1], settings, prefix=client_prefix(head, tail))):
        logits = rerun_step(head, tail, trunk, ids, all_logits=all_logits)  # (1, V)
        token = int(next_tokens(logits, settings, generator)[0])
        if token in eos_token_ids:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
