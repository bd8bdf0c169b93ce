"""What ``fedsplit attack`` measures: the sweep, the attacker's budget and the target (flags fill it)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def parse_point(text: str) -> tuple[int, float]:
    """'p:sigma' -> (p, sigma)."""
    try:
        p, sigma = text.split(":")
        return int(p), float(sigma)
    except ValueError:
        raise ValueError(f"attack.extra_points: expected 'p:sigma' such as '4:2.0', got {text!r}") from None


@dataclass
class AttackSettings:
    client: int = field(default=0, metadata={"help": "whose silo is the private data attacked"})
    head_depths: tuple[int, ...] = field(
        default=(0, 1, 2, 4), metadata={"help": "head depths p attacked (0 = embeddings)"}
    )
    sigmas: tuple[float, ...] = field(
        default=(0.0, 0.02, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
        metadata={"help": "noise sigmas on the sent hidden states"},
    )
    noise_depths: tuple[int, ...] = field(
        default=(), metadata={"help": "depths the sigma sweep runs at (empty = the run's p)"}
    )
    extra_points: tuple[str, ...] = field(
        default=(), metadata={"help": "more fine-tuned defences as 'p:sigma', e.g. '4:2.0'"}
    )
    public_positions: int = field(default=30000, metadata={"help": "public tokens the learned inverter is fitted on"})
    private_positions: int = field(default=3000, metadata={"help": "private tokens attacked"})
    seq_len: int = field(default=64, metadata={"help": "public window length"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge strength, relative to mean diag(X^T X)"})
    softmax_steps: int = field(default=200, metadata={"help": "steps of the softmax inverter (0 = ridge only)"})
    softmax_sigmas: tuple[float, ...] = field(
        default=(0.0,), metadata={"help": "sigmas where the softmax inverter also runs"}
    )
    gradient_batches: int = field(default=2, metadata={"help": "private batches attacked through their gradients"})
    matching_steps: int = field(default=40, metadata={"help": "gradient-matching (TAG/LAMP) optimisation steps"})
    gradient_sigmas: tuple[float, ...] = field(default=(0.0, 4.0), metadata={"help": "sigmas for the gradient attack"})
    quality_steps: int = field(default=30, metadata={"help": "LoRA steps of each quality-cost fine-tune"})
    quality_sigmas: tuple[float, ...] = field(
        default=(),
        metadata={
            "help": "noise levels fine-tuned (empty: the smallest swept sigma meeting the target, "
            "and the swept one below it)"
        },
    )
    adversarial_weights: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "learned defence weights fine-tuned"}
    )
    adversarial_sigma: float = field(
        default=-1.0, metadata={"help": "noise under the adversarial head (< 0: the swept sigma just below the target)"}
    )
    max_recovery: float = field(default=0.20, metadata={"help": "target: learned inversion recovers at most this"})
    max_quality_cost: float = field(default=0.05, metadata={"help": "target: relative held-out loss increase"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})
    seed: int = 0

    def __post_init__(self) -> None:
        self.head_depths = tuple(int(p) for p in self.head_depths)
        self.noise_depths = tuple(int(p) for p in self.noise_depths)
        self.extra_points = tuple(self.extra_points)
        for point in self.extra_points:
            parse_point(point)
        for name in ("sigmas", "softmax_sigmas", "gradient_sigmas", "quality_sigmas", "adversarial_weights"):
            setattr(self, name, _floats(getattr(self, name)))
            if any(not v >= 0 for v in getattr(self, name)):
                raise ValueError(f"attack.{name}: expected values >= 0, got {getattr(self, name)}")
        if not self.head_depths or min(self.head_depths) < 0:
            raise ValueError(f"attack.head_depths: expected values >= 0, got {self.head_depths}")
        if 0.0 not in self.sigmas:
            raise ValueError(f"attack.sigmas: expected 0.0 (no defence) among them, got {self.sigmas}")
        for name in ("public_positions", "private_positions", "seq_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"attack.{name}: expected >= 2, got {getattr(self, name)}")
        if self.gradient_batches < 1:
            raise ValueError(f"attack.gradient_batches: expected >= 1, got {self.gradient_batches}")
        for name in ("softmax_steps", "matching_steps", "quality_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"attack.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.max_recovery <= 1 or not self.max_quality_cost >= 0:
            raise ValueError(
                f"attack: expected 0 < max_recovery <= 1 and max_quality_cost >= 0, got "
                f"{self.max_recovery}, {self.max_quality_cost}"
            )


def quick_settings(**overrides) -> AttackSettings:
    """Seconds on a tiny model: the CLI's ``--quick`` and the tests."""
    preset = dict(
        head_depths=(0, 1),
        noise_depths=(0,),
        sigmas=(0.0, 64.0),
        public_positions=1500,
        private_positions=200,
        seq_len=32,
        softmax_steps=10,
        softmax_sigmas=(0.0,),
        gradient_batches=1,
        matching_steps=3,
        gradient_sigmas=(0.0,),
        quality_steps=2,
        quality_sigmas=(64.0,),
        adversarial_weights=(1.0,),
    )
    preset.update(overrides)
    return AttackSettings(**preset)  # type: ignore[arg-type]
