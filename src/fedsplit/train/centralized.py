"""The yardstick: the same data, loss, optimizer and schedule on the unsplit model.

Every federated result is compared against this. It uses the very functions the split path
uses (:mod:`fedsplit.train.optim`), so a difference between the two is a bug, not a choice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fedsplit.split.parts import positions_from_mask
from fedsplit.train.config import TrainConfig
from fedsplit.train.lm_loss import chunked_causal_lm_loss, model_loss_parts
from fedsplit.train.optim import (
    StepResult,
    autocast,
    build_optimizer,
    causal_lm_loss,
    clip_coefficient,
    grad_sq_norm,
    scale_grads,
    set_lr,
    token_weighted_loss,
)


class CentralizedTrainer:
    """LoRA fine-tuning of the unsplit model on pooled data."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], cfg: TrainConfig, total_steps: int) -> None:
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.params = list(params)
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_taken = 0
        # (decoder, LM head) for the chunked loss, found once; None: the model's own logits
        self._loss_parts = model_loss_parts(model) if cfg.loss_chunk_tokens else None

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        with autocast(self.cfg):
            return self.model(
                input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)
            ).logits  # (B, T, V)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The split client's loss on the unsplit model: LM head + cross-entropy in chunks of
        ``train.loss_chunk_tokens`` positions over the decoder's last hidden state (the same function on
        the same rows, so split and centralized runs differ only by a bug), or over the model's logits."""
        with autocast(self.cfg):
            if self._loss_parts is None:
                return causal_lm_loss(self.logits(batch), batch["labels"])
            decoder, head = self._loss_parts
            mask = batch["attention_mask"]
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask,
                             position_ids=positions_from_mask(mask)).last_hidden_state  # (B, T, H)
            return chunked_causal_lm_loss(hidden, head, batch["labels"], self.cfg.loss_chunk_tokens)

    def train_step(self, micro_batches: Iterable[dict[str, torch.Tensor]]) -> StepResult:
        losses = []
        for batch in micro_batches:
            loss = self.loss(batch)
            (loss / self.cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
        if len(losses) != self.cfg.grad_accum:
            raise ValueError(f"train_step: expected {self.cfg.grad_accum} micro-batches, got {len(losses)}")
        total = math.sqrt(grad_sq_norm(self.params))
        scale_grads(self.params, clip_coefficient(total, self.cfg.max_grad_norm))
        lr = set_lr(self.optimizer, self.steps_taken, self.cfg, self.total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        return StepResult(loss=sum(losses) / len(losses), grad_norm=total, lr=lr)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[dict[str, torch.Tensor]]) -> float:
        return token_weighted_loss(((batch, batch["labels"]) for batch in batches), loss=lambda b, _: self.loss(b))
