"""Prove a cut is exact: split logits, gradients and LoRA training equal the unsplit model's.

Used by ``fedsplit check-split`` and by the test suite (STYLE rule 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fedsplit.split.parts import SplitParts, positions_from_mask, split_model


@dataclass
class SplitCheck:
    """Largest absolute differences between the split and the unsplit model."""

    head_layers: int
    tail_layers: int
    logits: float
    grads: float
    params_after_training: float | None
    tolerance: float

    @property
    def ok(self) -> bool:
        worst = max(self.logits, self.grads, self.params_after_training or 0.0)
        return worst <= self.tolerance


def _batch(vocab: int, padding_side: str, generator: torch.Generator, batch: int = 3, seq: int = 24) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, keep in enumerate((seq, seq * 2 // 3, seq // 3)[:batch]):
        if padding_side == "right":
            mask[row, keep:] = 0
        else:
            mask[row, : seq - keep] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split_backward(parts: SplitParts, batch: dict, weights: torch.Tensor) -> torch.Tensor:
    """Forward and backward across both cuts exactly as client and server do (detach at each cut)."""
    mask = batch["attention_mask"]
    positions = positions_from_mask(mask)
    h_head = parts.head(batch["input_ids"], mask, positions)
    cut1 = h_head.detach().requires_grad_()
    h_trunk = parts.trunk(cut1, mask, positions)
    cut2 = h_trunk.detach().requires_grad_()
    logits = parts.tail(cut2, mask, positions)
    (logits * weights).sum().backward()
    h_trunk.backward(cut2.grad)
    h_head.backward(cut1.grad)
    return logits.detach()


def _max_diff(a: nn.Module, b: nn.Module, what: str) -> float:
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
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
        batch = _batch(model.config.vocab_size, side, generator)
        mask = batch["attention_mask"]
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        weights = torch.randn(ref_logits.shape, generator=generator)
        (ref_logits * weights).sum().backward()
        split_logits = _split_backward(parts, batch, weights)
        worst_logits = max(worst_logits, float((split_logits - ref_logits.detach()).abs().max()))
        worst_grads = max(worst_grads, _max_diff(split, reference, "grad"))
    return worst_logits, worst_grads


def check_training(model: nn.Module, head_layers: int, tail_layers: int, steps: int, seed: int = 0) -> float:
    """Max |parameter| difference after ``steps`` LoRA steps, split (serialized channel) vs centralized."""
    from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
    from fedsplit.train.centralized import CentralizedTrainer
    from fedsplit.train.config import TrainConfig
    from fedsplit.train.local import local_split

    cfg = TrainConfig(lr=1e-3, max_grad_norm=1.0, warmup_steps=1, schedule="cosine")
    split, central = copy.deepcopy(model).float(), copy.deepcopy(model).float()
    settings = [LoraSettings(r=4)] * 3
    local = local_split(split, cfg, steps, head_layers=head_layers, tail_layers=tail_layers, lora=settings, seed=seed)
    central_parts = split_model(central, head_layers, tail_layers)
    add_part_adapters(central_parts, settings, seed=seed)
    with torch.no_grad():  # start from non-zero LoRA B so gradients reach every adapter matrix
        for a, b in zip(
            [p for part in local.parts for p in trainable_parameters(part)],
            [p for part in central_parts for p in trainable_parameters(part)],
        ):
            a.add_(0.01)
            b.add_(0.01)
    client = local.client
    trainer = CentralizedTrainer(central, [p for part in central_parts for p in trainable_parameters(part)], cfg, steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = _batch(model.config.vocab_size, "right" if step % 2 == 0 else "left", generator)
        client.train_step([batch])
        trainer.train_step([batch])
    return _max_diff(split, central, "param")


def check_split(
    model: nn.Module, head_layers: int, tail_layers: int, *, train_steps: int = 0, tolerance: float = 1e-5, seed: int = 0
) -> SplitCheck:
    logits, grads = check_logits_and_grads(model, head_layers, tail_layers, seed)
    trained = check_training(model, head_layers, tail_layers, train_steps, seed) if train_steps else None
    return SplitCheck(head_layers, tail_layers, logits, grads, trained, tolerance)
