"""Optimization settings shared by split and centralized training (one source of truth)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """How each part is optimized. Split and centralized runs read the same object."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm (all parts); 0 = off"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    schedule: Literal["constant", "linear", "cosine"] = field(default="cosine", metadata={"help": "LR schedule"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (prompt cut first)"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "bf16 = CPU/GPU autocast"})
    padding_side: Literal["right", "left"] = field(default="right", metadata={"help": "where padding goes"})
    seed: int = field(default=0, metadata={"help": "seed for data order and adapter init"})
    loss_chunk_tokens: int = field(
        default=128, metadata={"help": "split client: LM head + loss over this many positions at a time "
                                       "(the batch's logits are never held at once); 0 = all at once"})

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "eps": self.eps > 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "grad_accum": isinstance(self.grad_accum, int) and self.grad_accum >= 1,
            "warmup_steps": isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "max_length": isinstance(self.max_length, int) and self.max_length >= 2,
            "loss_chunk_tokens": isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train.{name}: got invalid value {getattr(self, name)!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas: expected two values in [0, 1), got {self.betas!r}")
        for name, allowed in (("schedule", ("constant", "linear", "cosine")), ("precision", ("fp32", "bf16")),
                              ("padding_side", ("right", "left"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name}: expected one of {allowed}, got {getattr(self, name)!r}")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters for one part (head, trunk or tail)."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "module name suffixes to adapt; empty = the architecture's default"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r: expected an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha: expected > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
        self.target_modules = tuple(self.target_modules)
