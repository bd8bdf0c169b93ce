"""The run configuration: flat dataclasses that TOML files and CLI flags fill (STYLE rule 3).

Library classes never read this object; recipes turn it into plain typed arguments.
Every field carries its help text; ``fedsplit <command> --help-config`` prints them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Literal

from fedsplit.data.contract import ClientSource, DataContract
from fedsplit.strategy.config import StrategyConfig
from fedsplit.train.config import LoraSettings, TrainConfig
from fedsplit.transport.shaping import LinkShape


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m",
                      metadata={"help": "smollm2-135m, tiny-*, stories260k, a local dir or a hub id"})
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
    task: str = field(default="",
                      metadata={"help": "task template for files: rte, cb, copa, boolq, samsum, alpaca, emotion"})
    train_path: str = field(default="", metadata={"help": "training file (jsonl/json/csv/parquet or hf://...)"})
    eval_path: str = field(default="", metadata={"help": "held-out evaluation file"})
    num_clients: int = field(default=3, metadata={"help": "data silos = federated clients"})
    eval_fraction: float = field(default=0.1, metadata={"help": "stdlib-docs: held-out share of each family"})
    max_train_examples: int = field(default=0, metadata={"help": "cap on training examples (0 = all)"})
    max_eval_examples: int = field(default=64, metadata={"help": "cap on evaluation examples (0 = all)"})
    partition: Literal["default", "iid", "dirichlet", "quantity"] = field(
        default="default",
        metadata={"help": "simulation silos: default (stdlib-docs by family, files round-robin), iid, "
                          "dirichlet (label skew), quantity (size skew)"},
    )
    partition_alpha: float = field(default=0.5, metadata={"help": "Dirichlet alpha of dirichlet/quantity partitions"})

    def __post_init__(self) -> None:
        if self.partition not in ("default", "iid", "dirichlet", "quantity"):
            raise ValueError(f"data.partition: expected default, iid, dirichlet or quantity, got {self.partition!r}")
        if not self.partition_alpha > 0:
            raise ValueError(f"data.partition_alpha: expected > 0, got {self.partition_alpha}")
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
    max_examples_per_client: int = field(default=0, metadata={"help": "most examples a client's data report may "
                                                              "claim (0: unbounded; strategy.max_share still caps)"})
    update_bound_factor: float = field(default=10.0, metadata={"help": "refuse a client update that moved any element "
                                                               "more than this x local_steps x lr (0: off)"})
    max_update_norm: float = field(default=0.0, metadata={"help": "refuse a client update farther than this (L2) "
                                                          "from the global parts (0: off)"})
    round_mode: Literal["sync", "semi_sync", "async"] = field(
        default="sync", metadata={"help": "sync: a round waits for every participant (up to server.round_timeout_s); "
                                          "semi_sync: it aggregates what arrived by round_deadline_s; async: FedBuff, "
                                          "clients never wait, every buffer_size clients' updates are one round"})
    round_deadline_s: float = field(default=0.0, metadata={"help": "semi_sync: seconds after a round's start at "
                                                           "which it aggregates (0: server.round_timeout_s)"})
    buffer_size: int = field(default=2, metadata={"help": "async: distinct clients whose updates one aggregation "
                                                  "(round) takes, 2..clients (FedBuff's K)"})
    staleness_exponent: float = field(default=0.5, metadata={"help": "async: an update trained on parts tau rounds "
                                                             "old counts (1 + tau)^-exponent (0.5: FedBuff)"})
    max_staleness: int = field(default=16, metadata={"help": "async: refuse an update trained on parts more than "
                                                     "this many rounds old"})
    server_lr: float = field(default=1.0, metadata={"help": "async: the server's step on the buffered mean update "
                                                    "(1: a buffer of fresh updates gives their FedAvg)"})

    def __post_init__(self) -> None:
        if self.round_mode not in ("sync", "semi_sync", "async"):
            raise ValueError(f"federation.round_mode: expected sync, semi_sync or async, got {self.round_mode!r}")
        for key, least in (("buffer_size", 2), ("max_staleness", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"federation.{key}: expected an int >= {least}, got {value!r}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"federation.staleness_exponent: expected a finite value >= 0, got "
                             f"{self.staleness_exponent!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"federation.server_lr: expected a finite value > 0, got {self.server_lr!r}")
        if not (math.isfinite(self.round_deadline_s) and self.round_deadline_s >= 0):
            raise ValueError(f"federation.round_deadline_s: expected a finite value >= 0, got {self.round_deadline_s}")
        for key in ("rounds", "local_steps", "min_clients"):
            if getattr(self, key) < 1:
                raise ValueError(f"federation.{key}: expected >= 1, got {getattr(self, key)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"federation.fraction: expected 0 < x <= 1, got {self.fraction}")
        for key in ("max_examples_per_client", "update_bound_factor", "max_update_norm"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"federation.{key}: expected >= 0, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    max_new_tokens: int = field(default=48, metadata={"help": "generation length for ROUGE-L"})
    rouge_examples: int = field(default=32, metadata={"help": "held-out examples generated for ROUGE-L (0 = none)"})
    federated: bool = field(default=True, metadata={"help": "network runs: after each round its clients score the new "
                                                    "global parts on their own held-out data (docs/quality.md)"})
    federated_timeout_s: float = field(default=600.0, metadata={"help": "longest wait for the clients' evaluations"})
    federated_zero_shot: bool = field(default=True, metadata={"help": "network runs: the clients also score the "
                                                              "starting parts before round 1 (round 0, zero-shot)"})
    federated_generate: bool = field(default=False, metadata={"help": "federated evaluation also generates (ROUGE, "
                                                              "exact match): one FORWARD per new token, slow"})

    def __post_init__(self) -> None:
        if not self.federated_timeout_s > 0:
            raise ValueError(f"eval.federated_timeout_s: expected > 0, got {self.federated_timeout_s!r}")


@dataclass
class ServerConfig:
    address: str = field(default="127.0.0.1:50051", metadata={"help": "host:port the server listens on / clients dial"})
    mode: Literal["sequential", "client-batch", "hierarchical"] = field(
        default="sequential", metadata={"help": "how the trunk serves clients (see docs/parallel.md)"}
    )
    max_message_bytes: int = field(default=4 << 20, metadata={"help": "larger frames are sent in chunks"})
    max_tokens: int = field(default=0, metadata={"help": "largest batch x sequence a FORWARD may carry (0: twice "
                                                 "train.batch_size x train.max_length, the evaluation batch)"})
    max_abs_value: float = field(default=65504.0, metadata={"help": "largest magnitude a client's hidden state or "
                                                            "gradient value may have (fp16's range by default)"})
    round_timeout_s: float = field(default=3600.0, metadata={"help": "a round ends this long after it started"})
    step_timeout_s: float = field(default=120.0, metadata={"help": "a client owing a request this long fails"})
    join_timeout_s: float = field(default=600.0, metadata={"help": "longest wait for min_clients to join"})
    join_grace_s: float = field(default=10.0, metadata={"help": "once min_clients joined, wait this long for the rest"})
    deadline_s: float = field(default=300.0, metadata={"help": "client: longest wait for any reply"})
    threads: int = field(default=0, metadata={"help": "torch threads of the server process (0 = torch default)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "round checkpoints kept on disk (0: all)"})
    trunk_lease: Literal["step", "pass"] = field(
        default="step", metadata={"help": "sequential mode: a client holds the trunk from FORWARD to OPTIMIZER_STEP "
                                  "(step) or only while it computes, with its own gradient buffer (pass; see "
                                  "docs/parallel.md)"}
    )

    def __post_init__(self) -> None:
        if self.trunk_lease not in ("step", "pass"):
            raise ValueError(f"server.trunk_lease: expected step or pass, got {self.trunk_lease!r}")
        if self.trunk_lease == "pass" and self.mode != "sequential":
            raise ValueError(f"server.trunk_lease: pass needs mode = sequential, got mode = {self.mode!r}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"server.keep_checkpoints: expected >= 0, got {self.keep_checkpoints}")
        if ":" not in self.address:
            raise ValueError(f"server.address: expected host:port, got {self.address!r}")
        if self.mode not in ("sequential", "client-batch", "hierarchical"):
            raise ValueError(f"server.mode: expected sequential, client-batch or hierarchical, got {self.mode!r}")
        if self.max_message_bytes < 4096:
            raise ValueError(f"server.max_message_bytes: expected >= 4096, got {self.max_message_bytes}")
        if self.max_tokens < 0:
            raise ValueError(f"server.max_tokens: expected >= 0 (0: derived from the run), got {self.max_tokens}")
        if not (math.isfinite(self.max_abs_value) and self.max_abs_value > 0):
            raise ValueError(f"server.max_abs_value: expected a finite value > 0, got {self.max_abs_value}")


@dataclass
class SecurityConfig:
    keys_dir: str = field(default="keys",
                          metadata={"help": "directory written by `fedsplit keygen` (relative to the config file)"})
    server_name: str = field(default="server", metadata={"help": "name of the server's identity key pair in keys_dir"})
    clients: list[str] = field(default_factory=list,
                               metadata={"help": "admitted client ids; public keys at keys_dir/<id>.pub"})
    revoked: list[str] = field(default_factory=list, metadata={"help": "client ids refused even if listed"})
    insecure: bool = field(default=False, metadata={"help": "no TLS (AES-GCM sealing stays); prints a warning"})
    mutual_tls: bool = field(default=False, metadata={"help": "clients present CA-issued certificates too"})
    run_id: str = field(default="fedsplit-run", metadata={"help": "bound into every handshake and sealed frame"})


@dataclass
class ClientConfig:
    id: str = field(default="client-0", metadata={"help": "this client's id (its key pair is keys_dir/<id>.key/.pub)"})
    silo: int = field(default=0, metadata={"help": "which data silo of the run's dataset is this client's own"})
    threads: int = field(default=0, metadata={"help": "torch threads of the client process (0 = torch default)"})
    sources: list[ClientSource] = field(
        default_factory=list, metadata={"help": "[[client.sources]]: this client's own files, mapped onto [contract]"}
    )

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
    backend: Literal["auto", "gloo", "nccl"] = field(default="auto",
                                                     metadata={"help": "auto: nccl with a GPU per rank, else gloo"})
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
class AggregationConfig:
    """How the clients' head/tail adapters are merged each round (threat models: docs/aggregation.md)."""

    mode: Literal["plain", "secagg", "ckks", "hybrid"] = field(
        default="plain", metadata={"help": "plain FedAvg, secure aggregation, CKKS encryption, or hybrid per tensor"}
    )
    ring_bits: int = field(default=48, metadata={"help": "secagg: masked vectors live in Z_2^ring_bits (16..64)"})
    clip: float = field(default=4.0, metadata={"help": "secagg: values clipped to [-clip, clip] before quantization"})
    max_weight: int = field(default=4096, metadata={"help": "secagg: largest client weight (num_examples per round)"})
    threshold: int = field(default=0, metadata={"help": "secagg: Shamir threshold t (0 = majority of a sharing group)"})
    neighbours: int = field(default=0, metadata={"help": "secagg: k neighbours per client, even (0 = all clients)"})
    ckks_poly_degree: int = field(default=8192, metadata={"help": "ckks: ring dimension (slots = degree / 2)"})
    ckks_scale_bits: int = field(default=40, metadata={"help": "ckks: encoding scale 2^bits (precision)"})
    ckks_workers: int = field(default=1, metadata={"help": "ckks: threads encrypting blocks in parallel"})
    hybrid_encrypt: list[str] = field(
        default_factory=list,
        metadata={"help": "hybrid: fnmatch patterns of encrypted tensors (empty = head/* + last tail block)"},
    )
    hybrid_encrypted_mode: Literal["secagg", "ckks"] = field(
        default="secagg", metadata={"help": "hybrid: how encrypted tensors are aggregated"}
    )
    hybrid_top_fraction: float = field(
        default=0.0, metadata={"help": "hybrid: > 0 encrypts this share of parameters ranked by last global update RMS"}
    )
    dp_noise: Literal["none", "central", "distributed"] = field(
        default="none", metadata={"help": "DP-FedAvg noise: none, central (server; plain only), distributed (clients)"}
    )
    dp_clip: float = field(default=1.0, metadata={"help": "DP: L2 norm bound C of each client's update"})
    dp_noise_multiplier: float = field(default=1.0, metadata={"help": "DP: noise std / C on the sum"})
    dp_delta: float = field(default=1e-5, metadata={"help": "DP: delta of the reported (epsilon, delta)"})
    dp_epsilon_budget: float = field(default=0.0, metadata={"help": "DP: stop or warn above this epsilon (0 = none)"})
    dp_on_budget: Literal["stop", "warn"] = field(default="stop", metadata={"help": "DP: on exceeding the budget"})

    def __post_init__(self) -> None:
        choices = {"mode": ("plain", "secagg", "ckks", "hybrid"), "hybrid_encrypted_mode": ("secagg", "ckks"),
                   "dp_noise": ("none", "central", "distributed"), "dp_on_budget": ("stop", "warn")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"aggregation.{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not 16 <= self.ring_bits <= 64:
            raise ValueError(f"aggregation.ring_bits: expected 16..64, got {self.ring_bits!r}")
        if not self.clip > 0 or self.max_weight < 1 or self.threshold < 0:
            raise ValueError(
                f"aggregation: expected clip > 0, max_weight >= 1, threshold >= 0, got {self.clip!r}, "
                f"{self.max_weight!r}, {self.threshold!r}"
            )
        if self.neighbours < 0 or self.neighbours % 2:
            raise ValueError(f"aggregation.neighbours: expected an even int >= 0, got {self.neighbours!r}")
        if self.ckks_poly_degree not in (4096, 8192, 16384, 32768):
            raise ValueError(
                f"aggregation.ckks_poly_degree: expected 4096, 8192, 16384 or 32768, got {self.ckks_poly_degree!r}"
            )
        if not 20 <= self.ckks_scale_bits <= 50 or self.ckks_workers < 1:
            raise ValueError(
                f"aggregation: expected ckks_scale_bits in 20..50 and ckks_workers >= 1, got "
                f"{self.ckks_scale_bits!r}, {self.ckks_workers!r}"
            )
        if not 0.0 <= self.hybrid_top_fraction <= 1.0:
            raise ValueError(f"aggregation.hybrid_top_fraction: expected 0..1, got {self.hybrid_top_fraction!r}")
        if self.dp_noise == "central" and self.mode != "plain":
            raise ValueError(
                f"aggregation.dp_noise: central noise needs the server to see updates (mode = plain), got mode = "
                f"{self.mode!r}; use dp_noise = 'distributed'"
            )
        dp_ok = self.dp_clip > 0 and self.dp_noise_multiplier >= 0 and 0 < self.dp_delta < 1
        if not (dp_ok and self.dp_epsilon_budget >= 0):
            raise ValueError(
                f"aggregation: expected dp_clip > 0, dp_noise_multiplier >= 0, 0 < dp_delta < 1, "
                f"dp_epsilon_budget >= 0, "
                f"got {self.dp_clip!r}, {self.dp_noise_multiplier!r}, {self.dp_delta!r}, {self.dp_epsilon_budget!r}"
            )

    def secagg_params(self, num_clients: int):  # -> fedsplit.aggregation.secagg.SecAggParams
        """The secure-aggregation parameters for a round of ``num_clients`` (threshold 0: majority of each group)."""
        from fedsplit.aggregation.secagg import SecAggParams

        group = (num_clients if self.neighbours == 0 else min(num_clients, self.neighbours + 1))
        threshold = self.threshold or group // 2 + 1
        return SecAggParams(threshold=threshold, neighbours=self.neighbours, ring_bits=self.ring_bits, clip=self.clip,
                            max_weight=self.max_weight)

    def ckks_params(self):  # -> fedsplit.aggregation.ckks.CkksParams
        from fedsplit.aggregation.ckks import CkksParams

        return CkksParams(poly_degree=self.ckks_poly_degree, scale_bits=self.ckks_scale_bits, workers=self.ckks_workers)

    def hybrid_policy(self, names: list[str]):  # -> fedsplit.aggregation.hybrid.HybridPolicy
        """The per-tensor policy from ``hybrid_encrypt`` (empty: head/* and the tail's last block encrypted)."""
        from fedsplit.aggregation.hybrid import HybridPolicy, default_policy

        if not self.hybrid_encrypt:
            return default_policy(names, self.hybrid_encrypted_mode)
        return HybridPolicy(rules=tuple((p, self.hybrid_encrypted_mode) for p in self.hybrid_encrypt))


@dataclass
class PrivacyConfig:
    """Defences and the in-run audit of what the server could read back (docs/privacy.md)."""

    hidden_noise_std: float = field(default=0.0, metadata={"help": "Gaussian noise sigma on the hidden states a client "
                                                             "sends in training (FedSEA-LLaMA); 0 = off"})
    audit: bool = field(default=False, metadata={"help": "after each round, each client attacks its own traffic "
                                                 "(fedsplit.attacks.audit); only the scores leave it"})
    audit_samples: int = field(default=4, metadata={"help": "batches per client and round the audit attacks"})
    audit_inverter: str = field(default="", metadata={"help": "a RidgeInverter (safetensors) fitted on public text: "
                                                      "the audit runs attack (b) too; empty = attack (a) only"})

    def __post_init__(self) -> None:
        if not self.hidden_noise_std >= 0.0:
            raise ValueError(f"privacy.hidden_noise_std: expected >= 0, got {self.hidden_noise_std!r}")
        if self.audit_samples < 1:
            raise ValueError(f"privacy.audit_samples: expected >= 1, got {self.audit_samples!r}")


@dataclass
class WireConfig:
    """What crosses the cut: hidden states and their gradients (compute keeps train.precision)."""

    dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata={"help": "hidden states and gradients travel as fp32, bf16 (half the bytes, fp32's "
                                          "range) or fp16 (half the bytes; a value beyond 65504 is an error)"}
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"wire.dtype: expected fp32, bf16 or fp16, got {self.dtype!r}")

    def torch_dtype(self):  # -> torch.dtype (torch imported where used)
        from fedsplit.protocol.precision import wire_dtype

        return wire_dtype(self.dtype)


@dataclass
class MethodConfig:
    """What every part fine-tunes: LoRA (``[lora_head]``/``[lora_trunk]``/``[lora_tail]``) or P-tuning v2
    prefixes on each block (docs/ptuning.md; the trunk's prefixes never leave the server)."""

    name: Literal["lora", "prefix"] = field(default="lora", metadata={"help": "lora or prefix (P-tuning v2)"})
    num_virtual_tokens: int = field(default=16, metadata={"help": "prefix length per block (name = prefix)"})
    init_std: float = field(default=0.02, metadata={  # fedsplit.split.prefix.PREFIX_INIT_STD
        "help": "prefixes start from N(0, init_std^2) (name = prefix; PEFT's initialization is 1.0)"})

    def __post_init__(self) -> None:
        if self.name not in ("lora", "prefix"):
            raise ValueError(f"method.name: expected lora or prefix, got {self.name!r}")
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 1:
            raise ValueError(f"method.num_virtual_tokens: expected an integer >= 1, got {self.num_virtual_tokens!r}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not 0.0 <= self.init_std < float("inf"):
            raise ValueError(f"method.init_std: expected a finite number >= 0, got {self.init_std!r}")

    @property
    def prefix_tokens(self) -> int:
        """The prefix length to train, 0 for LoRA (the ``prefix_tokens`` argument of the recipes)."""
        return self.num_virtual_tokens if self.name == "prefix" else 0

    @property
    def final_adapter(self) -> str:
        """The run's one PEFT adapter under ``adapters/``: ``merged`` (the three LoRA adapters merged) or
        ``prefix`` (the three parts' prefixes in one prefix-tuning adapter)."""
        return "prefix" if self.name == "prefix" else "merged"


@dataclass
class SimulateConfig:
    """``fedsplit simulate`` only: per-client settings of the client processes it starts (docs/cross_cloud.md)."""

    links: dict[str, LinkShape] = field(
        default_factory=dict, metadata={"help": "[simulate.links.client-K]: client-K's link (latency_ms, "
                                                "bandwidth_mbps, jitter_ms, seed) instead of [link]"})

    def __post_init__(self) -> None:
        for key, shape in self.links.items():
            if not (key.startswith("client-") and key[7:].isdigit()):
                raise ValueError(f"simulate.links: expected client ids such as 'client-3' as keys, got {key!r}")
            if not isinstance(shape, LinkShape):
                raise ValueError(f"simulate.links.{key}: expected a table of link settings, got {shape!r}")


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
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    contract: DataContract = field(default_factory=DataContract)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    link: LinkShape = field(default_factory=LinkShape)  # client: shape its own link to the server (simulation)
    wire: WireConfig = field(default_factory=WireConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)  # fedsplit simulate: per-client links

    @property
    def lora(self) -> list[LoraSettings]:
        return [self.lora_head, self.lora_trunk, self.lora_tail]

    @property
    def max_tokens(self) -> int:
        """Most tokens one FORWARD may carry: ``server.max_tokens``, or the evaluation batch (2 x batch x length)."""
        return self.server.max_tokens or 2 * self.train.batch_size * self.train.max_length


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: ``section.key (default): help``."""
    import dataclasses

    lines: list[str] = []
    for f in fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            lines += describe(type(default), f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return lines


def run_config_hash(cfg: RunConfig, tokenizer) -> bytes:
    """What client and server must agree on: model, cut, adapters, optimization, tokenizer, protocol.

    Sent in every handshake; a mismatch is refused before any tensor moves.
    """
    from fedsplit.security.handshake import hash_run_config

    return hash_run_config(_agreed_sections(cfg, tokenizer))


def run_config_sections(cfg: RunConfig, tokenizer) -> dict[str, bytes]:
    """One hash per agreed section (protocol, model, lora, train, federation, wire, tokenizer, contract.<field>).

    Sent beside :func:`run_config_hash` so that a refused client is told which sections differ.
    """
    from fedsplit.security.handshake import hash_config_sections

    return hash_config_sections(_agreed_sections(cfg, tokenizer))


def _agreed_sections(cfg: RunConfig, tokenizer) -> dict[str, object]:
    import hashlib
    import json

    from fedsplit.configio import config_to_dict
    from fedsplit.protocol import PROTOCOL_VERSION

    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "protocol": int(PROTOCOL_VERSION),
        "model": config_to_dict(cfg.model),
        "lora": [config_to_dict(part) for part in cfg.lora],
        "train": config_to_dict(cfg.train),
        "federation": config_to_dict(cfg.federation),
        "wire": config_to_dict(cfg.wire),
        "method": config_to_dict(cfg.method),
        "tokenizer": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        **contract_sections(cfg.contract),
    }


def contract_sections(contract: DataContract) -> dict[str, object]:
    """The data contract, one handshake section per field (``contract.labels``, ...): a client whose
    contract differs is refused with the names of the fields that differ (``contract_diff``)."""
    from fedsplit.data.contract import contract_to_dict

    return {f"contract.{name}": value for name, value in contract_to_dict(contract).items()}
