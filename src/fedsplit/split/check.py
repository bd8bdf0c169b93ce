"""Prove a cut is exact: split logits and gradients equal the unsplit model's (FL-GLM, arXiv 2406.14898).

The parts are run in one process, detached at each cut exactly as client and server do. Used by
``fedsplit check-split`` (:mod:`fedsplit.recipes.check_split`, which also compares LoRA training
through a real client and trunk server) and by the test suite (STYLE rule 1).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fedsplit.split.parts import SplitParts, positions_from_mask, split_model


def vocab_size(model: nn.Module) -> int:
    config: Any = model.config  # a transformers PretrainedConfig
    return int(config.vocab_size)


def check_batch(
    vocab: int, padding_side: str, generator: torch.Generator, batch: int = 3, seq: int = 24
) -> dict[str, torch.Tensor]:
    """Random tokens; the rows keep all, 2/3 and 1/3 of ``seq``, padded on ``padding_side``; no loss on padding."""
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, keep in enumerate((seq, seq * 2 // 3, seq // 3)[:batch]):
        if padding_side == "right":
            mask[row, keep:] = 0
        else:
            mask[row, : seq - keep] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split_backward(parts: SplitParts, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Forward and backward across both cuts exactly as client and server do (detach at each cut)."""
    mask = batch["attention_mask"]
    positions = positions_from_mask(mask)
    h_head = parts.head(batch["input_ids"], mask, positions)
    cut1 = h_head.detach().requires_grad_()
    h_trunk = parts.trunk(cut1, mask, positions)
    cut2 = h_trunk.detach().requires_grad_()
    logits: torch.Tensor = parts.tail(cut2, mask, positions)  # (B, T, V)
    (logits * weights).sum().backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    h_trunk.backward(cut2.grad)
    h_head.backward(cut1.grad)
    return logits.detach()


def max_diff(a: nn.Module, b: nn.Module, what: str) -> float:
    """Max |difference| of the parameters (``what="param"``) or their gradients (``"grad"``) of two copies."""
    worst = 0.0
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        ta, tb = (pa.grad, pb.grad) if what == "grad" else (pa, pb)
        if ta is None and tb is None:
            continue
        if ta is None or tb is None:
            return float("inf")  # one side has a gradient the other lacks: not exact
        worst = max(worst, float((ta.detach() - tb.detach()).abs().max()))
    return worst


def check_logits_and_grads(model: nn.Module, head_layers: int, tail_layers: int, seed: int = 0) -> tuple[float, float]:
    """Max |logit| and |grad| difference over right- and left-padded batches (fp32, all parameters)."""
    reference = copy.deepcopy(model).float().eval()
    split = copy.deepcopy(model).float().eval()
    for module in (reference, split):
        module.requires_grad_(True)
    parts = split_model(split, head_layers, tail_layers)
    generator = torch.Generator().manual_seed(seed)
    worst_logits = worst_grads = 0.0
    for side in ("right", "left"):
        reference.zero_grad(set_to_none=True)
        split.zero_grad(set_to_none=True)
        batch = check_batch(vocab_size(model), side, generator)
        mask = batch["attention_mask"]
        positions = positions_from_mask(mask)
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        weights = torch.randn(ref_logits.shape, generator=generator)
        (ref_logits * weights).sum().backward()
        split_logits = _split_backward(parts, batch, weights)
        worst_logits = max(worst_logits, float((split_logits - ref_logits.detach()).abs().max()))
        worst_grads = max(worst_grads, max_diff(split, reference, "grad"))
    return worst_logits, worst_grads
