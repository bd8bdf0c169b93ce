"""``[strategy]``: which aggregation rule the server runs on the client parts, and its knobs.

A flat dataclass (STYLE rule 3) that TOML and ``--set strategy.key=value`` fill;
:func:`fedsplit.strategy.build.build_strategy` turns it into a ``Strategy``. See docs/strategies.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "dynamic", "median", "trimmed-mean", "krum", "multi-krum",
)  # fmt: skip
StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "dynamic", "median", "trimmed-mean", "krum", "multi-krum"
]


@dataclass
class StrategyConfig:
    name: StrategyName = field(default="fedavg", metadata={"help": ", ".join(STRATEGY_NAMES)})
    max_share: float = field(
        default=0.5, metadata={"help": "weighted rules: largest share of the average one client may hold, (0, 1] "
                                       "(at least 1 / clients; 1: no cap)"}
    )
    mu: float = field(default=0.01, metadata={"help": "fedprox: proximal coefficient mu (sent to the clients)"})
    eta: float = field(default=1e-2, metadata={"help": "fedadam/fedyogi/fedadagrad: server learning rate"})
    beta1: float = field(default=0.9, metadata={"help": "fedadam/fedyogi/fedadagrad: first-moment decay"})
    beta2: float = field(default=0.99, metadata={"help": "fedadam/fedyogi: second-moment decay"})
    tau: float = field(default=1e-3, metadata={"help": "fedadam/yogi/adagrad: adaptivity (floor of sqrt v)"})
    alpha: float = field(default=1.0, metadata={"help": "dynamic: exponent of B_k in omega_k"})
    loss_term: Literal["loss", "inverse"] = field(
        default="loss", metadata={"help": "dynamic: weight by the client's loss L_k ('loss') or by 1/L_k ('inverse')"}
    )
    trim_beta: float = field(default=0.1, metadata={"help": "trimmed-mean: share trimmed at each end, [0, 0.5)"})
    byzantine: int = field(default=1, metadata={"help": "krum: Byzantine clients f tolerated (needs n >= f + 3)"})
    selected: int = field(default=0, metadata={"help": "multi-krum: updates averaged m (0: n - f)"})

    def __post_init__(self) -> None:
        if self.name not in STRATEGY_NAMES:
            raise ValueError(f"strategy.name: expected one of {', '.join(STRATEGY_NAMES)}, got {self.name!r}")
        for key in ("max_share", "mu", "eta", "beta1", "beta2", "tau", "alpha", "trim_beta"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"strategy.{key}: expected a finite number, got {getattr(self, key)!r}")
        if not 0 < self.max_share <= 1:
            raise ValueError(f"strategy.max_share: expected 0 < x <= 1, got {self.max_share}")
        if self.mu < 0:
            raise ValueError(f"strategy.mu: expected >= 0, got {self.mu}")
        if self.eta <= 0 or self.tau <= 0:
            raise ValueError(f"strategy.eta, strategy.tau: expected > 0, got {self.eta}, {self.tau}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"strategy.{key}: expected 0 <= x < 1, got {getattr(self, key)}")
        if self.loss_term not in ("loss", "inverse"):
            raise ValueError(f"strategy.loss_term: expected 'loss' or 'inverse', got {self.loss_term!r}")
        if not 0 <= self.trim_beta < 0.5:
            raise ValueError(f"strategy.trim_beta: expected 0 <= x < 0.5, got {self.trim_beta}")
        if self.byzantine < 0 or self.selected < 0:
            got = f"{self.byzantine}, {self.selected}"
            raise ValueError(f"strategy.byzantine, strategy.selected: expected >= 0, got {got}")
