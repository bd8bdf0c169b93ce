"""What the server receives at cut 1: the head's output for a client's batch, for any head depth p.

The attacker knows the base weights and, worst case, the current global head adapter, so it can
run the head itself on any text. Depth p = 0 is the classic split (embeddings only); ``ModelConfig``
requires p >= 1 for training, but the split engine's :class:`~fedsplit.split.parts.Head` computes
p = 0 directly as the embedding output. Adapters injected into the model's blocks (the global head
adapter) are part of the head, because the parts share their modules with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedsplit.split.arch import arch_spec
from fedsplit.split.parts import Head, Trunk, num_blocks, positions_from_mask


def _model_type(model: nn.Module) -> str:
    config: Any = model.config
    return str(config.model_type)


def embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The input token embeddings ``(V, H)``, detached: what nearest-neighbour inversion searches."""
    embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
    return embeddings.weight.detach()


def head_of(model: nn.Module, head_layers: int) -> Head:
    """The client's head (embeddings + blocks [0, p)) for any ``0 <= p <= N``, sharing ``model``'s modules."""
    n = num_blocks(model)
    if not 0 <= head_layers <= n:
        raise ValueError(f"head_layers: expected 0..{n} for this model, got {head_layers}")
    return Head(model, arch_spec(_model_type(model)), head_layers)


@torch.no_grad()
def cut_hidden(
    model: nn.Module, head_layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states ``(B, T, H)`` the server receives at cut 1 for head depth ``head_layers``."""
    return head_of(model, head_layers)(input_ids, attention_mask, positions_from_mask(attention_mask))


@torch.no_grad()
def hidden_by_depth(
    model: nn.Module, depths: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[int, torch.Tensor]:
    """``{p: (B, T, H)}`` for every p in ``depths`` in one pass: the head to p = 0, then block runs p_i..p_i+1."""
    wanted = sorted(set(depths))
    if not wanted or wanted[0] < 0 or wanted[-1] > num_blocks(model):
        raise ValueError(f"depths: expected values in 0..{num_blocks(model)}, got {list(depths)}")
    spec = arch_spec(_model_type(model))
    positions = positions_from_mask(attention_mask)  # (B, T)
    hidden = Head(model, spec, 0)(input_ids, attention_mask, positions)  # (B, T, H): embeddings
    out, at = {}, 0
    for p in wanted:
        if p > at:  # the same blocks the head would run, through the split engine's own block runner
            hidden = Trunk(model, spec, at, p)(hidden, attention_mask, positions)
            at = p
        out[p] = hidden
    return out
