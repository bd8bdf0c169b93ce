"""The run configuration: flat dataclasses that TOML files and CLI flags fill (STYLE rule 3).

Library classes never read this object; recipes turn it into plain typed arguments.
Every field carries its help text; ``fedsplit <command> --help-config`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from fedsplit.adapters import LoraSettings
from fedsplit.train.config import TrainConfig


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-*, stories260k, a local dir or a hub id"})
    head_layers: int = field(default=1, metadata={"help": "blocks kept by each client before the trunk (p)"})
    tail_layers: int = field(default=1, metadata={"help": "blocks kept by each client after the trunk (q)"})

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name: expected a model name or path, got ''")
        for key in ("head_layers", "tail_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}: expected >= 1, got {getattr(self, key)}")


@dataclass
class DataConfig:
    dataset: Literal["stdlib-docs", "files"] = field(
        default="stdlib-docs", metadata={"help": "built-in stdlib-docs silos, or your own files (train_path/eval_path)"}
    )
    task: str = field(default="", metadata={"help": "task template for files: rte, cb, copa, boolq, samsum, alpaca, emotion"})
    train_path: str = field(default="", metadata={"help": "training file (jsonl/json/csv/parquet or hf://...)"})
    eval_path: str = field(default="", metadata={"help": "held-out evaluation file"})
    num_clients: int = field(default=3, metadata={"help": "data silos = federated clients"})
    eval_fraction: float = field(default=0.1, metadata={"help": "stdlib-docs: held-out share of each family"})
    max_train_examples: int = field(default=0, metadata={"help": "cap on training examples (0 = all)"})
    max_eval_examples: int = field(default=64, metadata={"help": "cap on evaluation examples (0 = all)"})

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"data.num_clients: expected >= 1, got {self.num_clients}")
        if self.dataset == "files" and not (self.task and self.train_path and self.eval_path):
            raise ValueError("data: dataset = 'files' needs task, train_path and eval_path")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction: expected 0 < x < 1, got {self.eval_fraction}")


@dataclass
class FederationConfig:
    rounds: int = field(default=3, metadata={"help": "federated rounds (client adapters averaged after each)"})
    local_steps: int = field(default=8, metadata={"help": "optimizer steps per client per round"})
    min_clients: int = field(default=1, metadata={"help": "fewest client results a round may aggregate"})
    fraction: float = field(default=1.0, metadata={"help": "share of clients sampled per round"})

    def __post_init__(self) -> None:
        for key in ("rounds", "local_steps", "min_clients"):
            if getattr(self, key) < 1:
                raise ValueError(f"federation.{key}: expected >= 1, got {getattr(self, key)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"federation.fraction: expected 0 < x <= 1, got {self.fraction}")


@dataclass
class EvalConfig:
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for ROUGE-L"})
    rouge_examples: int = field(default=32, metadata={"help": "held-out examples generated for ROUGE-L (0 = none)"})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora_head: LoraSettings = field(default_factory=LoraSettings)
    lora_trunk: LoraSettings = field(default_factory=LoraSettings)
    lora_tail: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def lora(self) -> list[LoraSettings]:
        return [self.lora_head, self.lora_trunk, self.lora_tail]


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: ``section.key (default): help``."""
    import dataclasses

    lines: list[str] = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines += describe(type(default), f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return lines
