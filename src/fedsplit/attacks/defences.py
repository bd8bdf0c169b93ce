"""Quality cost of the defences: held-out loss after a short LoRA fine-tune with the defence on vs off.

* Gaussian noise on the sent hidden states (FedSEA-LLaMA): the real :class:`~fedsplit.client.SplitClient`
  with ``hidden_noise_std`` against a :class:`~fedsplit.server.TrunkServer`, in process
  (:func:`fedsplit.recipes.local.local_split`); noise in training only.
* Adversarial training of the client's head (a learned defence, as VFLAIR-LLM's adversarial
  defences): the head's LoRA (on every linear layer of its blocks) also minimises how well a ridge
  inverter, refitted on the client's own recent hidden states every few steps, maps what it sends
  onto the true tokens' embeddings: ``loss = LM + weight * mean cos(ridge(h_sent), e_token)``.
  Split training is exact (``fedsplit check-split``), so this loop over the three parts in one
  process is the split step.

Held-out loss is measured on the unsplit model (no noise), so ``quality_cost`` is the relative
increase over the undefended fine-tune with the same data, steps and seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.attacks.inversion import RidgeInverter
from fedsplit.client import SplitClient
from fedsplit.recipes.evaluate import heldout_loss
from fedsplit.recipes.local import local_split
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import build_optimizer, causal_lm_loss, clip_coefficient, grad_sq_norm, scale_grads, set_lr

Batch = dict[str, torch.Tensor]
ALL_LINEAR = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


@dataclass(frozen=True)
class Defence:
    """One point of the sweep: head depth p, noise sigma, adversarial weight (0 = off)."""

    head_layers: int = 1
    noise_std: float = 0.0
    adversarial_weight: float = 0.0

    @property
    def name(self) -> str:
        extra = f"+adv{self.adversarial_weight:g}" if self.adversarial_weight else ""
        return f"p{self.head_layers}-sigma{self.noise_std:g}{extra}"


@dataclass
class QualityResult:
    defence: Defence
    heldout_loss: float
    zero_shot_loss: float
    train_losses: list[float]


def finetune(
    model: nn.Module,
    defence: Defence,
    train: Sequence[Batch],
    held_out: Sequence[Batch],
    cfg: TrainConfig,
    steps: int,
    *,
    tail_layers: int = 1,
    lora: LoraSettings | None = None,
    seed: int = 0,
) -> QualityResult:
    """Fine-tune ``model`` in place (LoRA on every part) with ``defence``; held-out loss before and after."""
    lora = lora or LoraSettings()
    torch.manual_seed(seed)
    model.eval()
    zero_shot = heldout_loss(model, held_out)
    if defence.adversarial_weight:
        losses = _adversarial_loop(model, defence, train, cfg, steps, tail_layers, lora, seed)
    else:
        losses = _noise_loop(model, defence, train, cfg, steps, tail_layers, lora, seed)
    model.eval()
    return QualityResult(defence, heldout_loss(model, held_out), zero_shot, losses)


def _noise_loop(model, defence: Defence, train, cfg, steps, tail_layers, lora, seed) -> list[float]:
    split = local_split(
        model, cfg, steps, head_layers=defence.head_layers, tail_layers=tail_layers, lora=(lora,) * 3, seed=seed
    )
    client = SplitClient(
        split.parts.head, split.parts.tail, split.channel, cfg, steps, hidden_noise_std=defence.noise_std
    )
    model.train()
    return [
        client.train_step([train[i % len(train)]]).loss
        for i in tqdm(range(steps), desc=f"fine-tune {defence.name}", unit="step", leave=False)
    ]


def _adversarial_loop(
    model, defence: Defence, train, cfg, steps, tail_layers, lora, seed, refit_every: int = 4
) -> list[float]:
    parts = split_model(model, defence.head_layers, tail_layers)
    targets = ALL_LINEAR["gpt2" if model.config.model_type == "gpt2" else "llama"]
    add_part_adapters(parts, [replace(lora, target_modules=targets), lora, lora], seed=seed)
    params = [p for part in parts for p in trainable_parameters(part)]
    optimizer = build_optimizer(params, cfg)
    embedding = model.get_input_embeddings().weight.detach()
    recent: list[tuple[torch.Tensor, torch.Tensor]] = []
    inverter: RidgeInverter | None = None
    losses = []
    model.train()
    for step in tqdm(range(steps), desc=f"fine-tune {defence.name}", unit="step", leave=False):
        batch = train[step % len(train)]
        ids, mask, keep = batch["input_ids"], batch["attention_mask"], batch["attention_mask"].bool()
        positions = positions_from_mask(mask)
        h_head = parts.head(ids, mask, positions)  # (B, T, H) -> cut 1
        sent = h_head + defence.noise_std * torch.randn_like(h_head) if defence.noise_std else h_head
        logits = parts.tail(parts.trunk(sent, mask, positions), mask, positions)  # (B, T, V)
        loss = causal_lm_loss(logits, batch["labels"])
        recent = (recent + [(sent[keep].detach(), ids[keep])])[-refit_every:]
        if inverter is None or step % refit_every == 0:  # the client plays the attacker on its own traffic
            inverter = RidgeInverter.fit(
                torch.cat([h for h, _ in recent]), torch.cat([t for _, t in recent]), embedding, validation=0.0
            )
        x = torch.cat([sent[keep], sent.new_ones(int(keep.sum()), 1)], dim=1)  # (N, H+1)
        leak = F.cosine_similarity(x @ inverter.weight, embedding[ids[keep]], dim=-1).mean()
        (loss + defence.adversarial_weight * leak).backward()
        scale_grads(params, clip_coefficient(math.sqrt(grad_sq_norm(params)), cfg.max_grad_norm))
        set_lr(optimizer, step, cfg, steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
