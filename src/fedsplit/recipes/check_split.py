"""``fedsplit check-split``: prove a cut is exact, up to K LoRA steps (FL-GLM, arXiv 2406.14898; STYLE rule 1).

Logits and gradients: :func:`fedsplit.split.check.check_logits_and_grads` (the parts alone).
Training: K LoRA steps through a real :class:`~fedsplit.client.SplitClient` and
:class:`~fedsplit.server.TrunkServer` joined by the serializing in-process channel
(:mod:`fedsplit.recipes.local`) against the same K steps of the centralized trainer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.recipes.local import local_split
from fedsplit.split.check import check_batch, check_logits_and_grads, max_diff, vocab_size
from fedsplit.split.parts import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig


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


def check_training(model: nn.Module, head_layers: int, tail_layers: int, steps: int, seed: int = 0) -> float:
    """Max |parameter| difference after ``steps`` LoRA steps, split (serialized channel) vs centralized."""
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
            strict=True,
        ):
            a.add_(0.01)
            b.add_(0.01)
    client = local.client
    trainer = CentralizedTrainer(central, [p for part in central_parts for p in trainable_parameters(part)], cfg, steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = check_batch(vocab_size(model), "right" if step % 2 == 0 else "left", generator)
        client.train_step([batch])
        trainer.train_step([batch])
    return max_diff(split, central, "param")


def check_split(
    model: nn.Module, head_layers: int, tail_layers: int, *, train_steps: int = 0, tolerance: float = 1e-5,
    seed: int = 0,
) -> SplitCheck:
    logits, grads = check_logits_and_grads(model, head_layers, tail_layers, seed)
    trained = check_training(model, head_layers, tail_layers, train_steps, seed) if train_steps else None
    return SplitCheck(head_layers, tail_layers, logits, grads, trained, tolerance)
