"""The run configuration: flat dataclasses that TOML files and CLI flags fill (STYLE rule 3).

Library classes never read this object; recipes turn it into plain typed arguments.
Every field carries its help text; ``fedsplit <command> --help-config`` prints them.
"""

from __future__ import annotations

import os
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
class ServerConfig:
    address: str = field(default="127.0.0.1:50051", metadata={"help": "host:port the server listens on / clients dial"})
    mode: Literal["sequential", "client-batch", "hierarchical"] = field(
        default="sequential", metadata={"help": "how the trunk serves clients (see docs/parallel.md)"}
    )
    max_message_bytes: int = field(default=4 << 20, metadata={"help": "larger frames are sent in chunks"})
    max_tokens: int = field(default=1 << 20, metadata={"help": "largest batch x sequence a FORWARD may carry"})
    round_timeout_s: float = field(default=3600.0, metadata={"help": "a round ends this long after it started"})
    step_timeout_s: float = field(default=120.0, metadata={"help": "a client owing a request this long fails"})
    join_timeout_s: float = field(default=600.0, metadata={"help": "longest wait for min_clients to join"})
    join_grace_s: float = field(default=10.0, metadata={"help": "once min_clients joined, wait this long for the rest"})
    deadline_s: float = field(default=300.0, metadata={"help": "client: longest wait for any reply"})
    threads: int = field(default=0, metadata={"help": "torch threads of the server process (0 = torch default)"})

    def __post_init__(self) -> None:
        if ":" not in self.address:
            raise ValueError(f"server.address: expected host:port, got {self.address!r}")
        if self.mode not in ("sequential", "client-batch", "hierarchical"):
            raise ValueError(f"server.mode: expected sequential, client-batch or hierarchical, got {self.mode!r}")
        for key in ("max_message_bytes", "max_tokens"):
            if getattr(self, key) < 1024:
                raise ValueError(f"server.{key}: expected >= 1024, got {getattr(self, key)}")


@dataclass
class SecurityConfig:
    keys_dir: str = field(default="keys", metadata={"help": "directory written by `fedsplit keygen` (relative to the config file)"})
    server_name: str = field(default="server", metadata={"help": "name of the server's identity key pair in keys_dir"})
    clients: list[str] = field(default_factory=list, metadata={"help": "admitted client ids; public keys at keys_dir/<id>.pub"})
    revoked: list[str] = field(default_factory=list, metadata={"help": "client ids refused even if listed"})
    insecure: bool = field(default=False, metadata={"help": "no TLS (AES-GCM sealing stays); prints a warning"})
    mutual_tls: bool = field(default=False, metadata={"help": "clients present CA-issued certificates too"})
    run_id: str = field(default="fedsplit-run", metadata={"help": "bound into every handshake and sealed frame"})


@dataclass
class ClientConfig:
    id: str = field(default="client-0", metadata={"help": "this client's id (its key pair is keys_dir/<id>.key/.pub)"})
    silo: int = field(default=0, metadata={"help": "which data silo of the run's dataset is this client's own"})
    threads: int = field(default=0, metadata={"help": "torch threads of the client process (0 = torch default)"})

    def __post_init__(self) -> None:
        if self.silo < 0:
            raise ValueError(f"client.silo: expected >= 0, got {self.silo}")


@dataclass
class HierarchyConfig:
    """How the root and its sub-servers run. Times are seconds."""

    subservers: int = field(default=2, metadata={"help": "K: trunk replicas (sub-server processes)"})
    sync_every: int = field(default=8, metadata={"help": "R: optimizer steps per sub-server between averagings"})
    control_host: str = field(default="127.0.0.1", metadata={"help": "where the root's control store listens"})
    control_port: int = field(default=0, metadata={"help": "control store port (0: any free port, local launches)"})
    collective_host: str = field(default="127.0.0.1", metadata={"help": "root address for the process group"})
    listen_host: str = field(default="127.0.0.1", metadata={"help": "sub-servers' gRPC host"})
    listen_port_base: int = field(default=0, metadata={"help": "sub-server k listens on base + k (0: any free port)"})
    threads: int = field(default=0, metadata={"help": "torch threads per sub-server (0: cpu_count // subservers)"})
    shared_weights: bool = field(default=True, metadata={"help": "memory-map the frozen trunk (safetensors); "
                                                         "false: a private copy per sub-server"})
    backend: Literal["auto", "gloo", "nccl"] = field(default="auto", metadata={"help": "auto: nccl with a GPU per rank, else gloo"})
    startup_timeout_s: float = field(default=180.0, metadata={"help": "wait this long for sub-servers to announce"})
    sync_timeout_s: float = field(default=60.0, metadata={"help": "collective and control-result deadline"})
    drain_timeout_s: float = field(default=120.0, metadata={"help": "then a started step is discarded to sync"})
    relay_deadline_s: float = field(default=300.0, metadata={"help": "longest wait for a sub-server's reply"})
    probe_timeout_s: float = field(default=5.0, metadata={"help": "connect deadline of a session to a sub-server"})
    max_streams: int = field(default=64, metadata={"help": "gRPC streams per sub-server (one per client)"})
    scale_lr: bool = field(default=True, metadata={"help": "replica trunk LR x subservers: the averaged K replicas "
                                                   "move as far per sample as one sequential trunk"})

    def __post_init__(self) -> None:
        for name in ("subservers", "sync_every", "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"hierarchy.{name}: expected >= 1, got {getattr(self, name)!r}")
        for name in ("control_port", "listen_port_base", "threads"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"hierarchy.{name}: expected 0..65535, got {getattr(self, name)!r}")
        for name in ("startup_timeout_s", "sync_timeout_s", "drain_timeout_s", "relay_deadline_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"hierarchy.{name}: expected > 0, got {getattr(self, name)!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"hierarchy.backend: expected auto, gloo or nccl, got {self.backend!r}")

    def threads_per_subserver(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.subservers)


@dataclass
class PrivacyConfig:
    """Defences and the in-run audit of what the server could read back (docs/privacy.md)."""

    hidden_noise_std: float = field(default=0.0, metadata={"help": "Gaussian noise sigma on the hidden states a client "
                                                             "sends in training (FedSEA-LLaMA); 0 = off"})
    audit: bool = field(default=False, metadata={"help": "after each round, each client attacks its own traffic "
                                                 "(fedsplit.attacks.audit); only the scores leave it"})
    audit_samples: int = field(default=4, metadata={"help": "batches per client and round the audit attacks"})

    def __post_init__(self) -> None:
        if not self.hidden_noise_std >= 0.0:
            raise ValueError(f"privacy.hidden_noise_std: expected >= 0, got {self.hidden_noise_std!r}")
        if self.audit_samples < 1:
            raise ValueError(f"privacy.audit_samples: expected >= 1, got {self.audit_samples!r}")


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
    server: ServerConfig = field(default_factory=ServerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

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


def run_config_hash(cfg: RunConfig, tokenizer) -> bytes:
    """What client and server must agree on: model, cut, adapters, optimization, tokenizer, protocol.

    Sent in every handshake; a mismatch is refused before any tensor moves.
    """
    import hashlib
    import json

    from fedsplit.configio import config_to_dict
    from fedsplit.protocol import PROTOCOL_VERSION
    from fedsplit.security.handshake import hash_run_config

    vocab = sorted(tokenizer.get_vocab().items())
    agreed = {
        "protocol": int(PROTOCOL_VERSION),
        "model": config_to_dict(cfg.model),
        "lora": [config_to_dict(part) for part in cfg.lora],
        "train": config_to_dict(cfg.train),
        "federation": config_to_dict(cfg.federation),
        "tokenizer": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
    }
    return hash_run_config(agreed)
