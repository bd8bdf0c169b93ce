"""Optimizer, schedule, clipping and loss: the same functions for every part and every mode.

Global-norm clipping across a cut: each side sums its squared gradient norms, the client sends
its sum to the server, the server adds the trunk's and answers with the clip coefficient, and
both sides scale before stepping. This is exactly ``clip_grad_norm_`` over all parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedsplit.train.config import TrainConfig

IGNORE_INDEX = -100


@dataclass
class StepResult:
    """What one optimizer step reports, split or centralized."""

    loss: float
    grad_norm: float
    lr: float


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: add LoRA adapters before building the optimizer")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def schedule_horizon(rounds: int, local_steps: int, steppers: int = 1) -> int:
    """The length of an LR schedule over a federated run, in optimizer steps.

    A client takes ``local_steps`` steps per round, so its horizon is ``rounds * local_steps``
    (``steppers = 1``). The trunk takes one step per client step it serves: ``steppers`` is the
    number of clients stepping it per client step (all of them when served one by one, 1 with
    client-batching, where one trunk step serves the whole group). Centralized training that sees
    as many batches as the federation uses ``steppers = num_clients`` too.
    """
    for name, value in (("rounds", rounds), ("local_steps", local_steps), ("steppers", steppers)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    return rounds * local_steps * steppers


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, total_steps: int) -> float:
    lr = cfg.lr * lr_factor(step, cfg, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class NonFiniteStepError(ValueError):
    """An optimizer step was refused: its gradients, norm or result were not finite."""


def grad_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Sum of squared gradient entries, accumulated in float64 (a finite fp32 gradient cannot overflow it)."""
    return float(sum(p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None))


def global_norm(*sq_norms: float) -> float:
    """``sqrt`` of the summed squared norms of every part; `NonFiniteStepError` unless finite.

    A NaN norm would make ``min(1, max_norm / (nan + eps))`` answer 1.0 and let the step through.
    """
    total = math.fsum(sq_norms)
    if not math.isfinite(total):
        raise NonFiniteStepError(
            f"the global gradient norm is not finite (squared norms {', '.join(map(repr, sq_norms))})"
        )
    return math.sqrt(total)


def guarded_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """``optimizer.step()``, undone (parameters and moments restored) if it leaves anything non-finite.

    The snapshot costs one copy of the trainable (LoRA) tensors and their moments: small next to a
    forward pass. On refusal the gradients are dropped too, so the next step starts clean.
    """
    saved_params = [p.detach().clone() for p in params]
    saved_state = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    if all_finite(params, optimizer):
        return
    with torch.no_grad():
        for p, saved in zip(params, saved_params, strict=True):
            p.copy_(saved)
    for p in params:
        if id(p) in saved_state:
            optimizer.state[p] = saved_state[id(p)]
        else:
            optimizer.state.pop(p, None)
    optimizer.zero_grad(set_to_none=True)
    raise NonFiniteStepError("the optimizer step produced non-finite parameters or moments; it was undone")


def all_finite(params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every parameter (and every floating tensor of its optimizer state) is finite."""
    for p in params:
        if not bool(torch.isfinite(p.detach()).all()):
            return False
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return False
    return True


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s coefficient; 1.0 when clipping is off or not needed."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def scale_grads(params: Iterable[torch.nn.Parameter], coef: float) -> None:
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised tokens (labels != -100)."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def token_weighted_loss(pairs: Iterable[tuple[Any, torch.Tensor]],
                        loss: Callable[[Any, torch.Tensor], torch.Tensor] = causal_lm_loss) -> float:
    """Mean loss over every supervised token of several batches of ``(logits, labels)`` (or of
    whatever ``loss`` takes with the labels)."""
    total, tokens = 0.0, 0
    for scored, labels in pairs:
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(loss(scored, labels)) * n
        tokens += n
    return total / max(tokens, 1)


def autocast(cfg: TrainConfig, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, else nothing."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def microbatches(batches: Iterable[dict], accum: int) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, is_last_of_accumulation_cycle)."""
    for index, batch in enumerate(batches):
        yield batch, (index + 1) % accum == 0
