"""A split client and a trunk server joined by the in-process channel: the split step in one process.

Used to prove split == centralized (:mod:`fedsplit.recipes.check_split`) and by the benchmarks. The
channel still serializes every message to bytes, exactly as the network carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.channel import Channel, in_process_channel
from fedsplit.client import SplitClient
from fedsplit.server import TrunkServer
from fedsplit.split import SplitParts, split_model
from fedsplit.split.prefix import add_part_prefixes
from fedsplit.train.config import TrainConfig


@dataclass
class LocalSplit:
    parts: SplitParts
    server: TrunkServer
    client: SplitClient
    channel: Channel


def local_split(
    model: nn.Module,
    cfg: TrainConfig,
    total_steps: int,
    *,
    head_layers: int = 1,
    tail_layers: int = 1,
    lora: Sequence[LoraSettings] = (LoraSettings(),) * 3,
    seed: int = 0,
    client_id: str = "local",
    prefix_tokens: int = 0,
) -> LocalSplit:
    """Cut ``model`` (in place), add LoRA to each part, and connect client and server in process.

    ``prefix_tokens`` > 0: P-tuning v2 prefixes of that length on every block instead of LoRA
    (:mod:`fedsplit.split.prefix`, ``[method] name = "prefix"``)."""
    parts = split_model(model, head_layers, tail_layers)
    if prefix_tokens:
        add_part_prefixes(parts, prefix_tokens, seed=seed)
    else:
        add_part_adapters(parts, lora, seed=seed)
    server = TrunkServer(parts.trunk, cfg, total_steps)
    channel, _ = in_process_channel(client_id,
                                    lambda kind, rnd, step, msg: server.handle(client_id, kind, rnd, step, msg))
    return LocalSplit(parts, server, SplitClient(parts.head, parts.tail, channel, cfg, total_steps), channel)
