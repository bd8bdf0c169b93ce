"""A federated split run in one process, with the network run's math (FL-GLM, arXiv 2406.14898).

The same engine as ``fedsplit server``/``client``, minus the sockets: one :class:`TrunkServer`
(its adapter updated at every client step), one :class:`SplitClient` per client talking to it
through the in-process channel (every message still serialized), ``FedAvg`` of the head/tail
adapters after each round. What the network run does, this does in the same order:

    round r:  every client loads the global head/tail adapters, gets a fresh AdamW
              step i = 0..local_steps-1:  client-0, client-1, ... each take one split step
                                          (the coordinator's ordered_steps turn order)
              FedAvg(head/tail adapters, weighted by examples) -> new global adapters

Data order, LR schedules (client: rounds x local_steps; trunk: x clients) and the client
batches are those of ``fedsplit.recipes.network``/``fedsplit.client.runner``. The clients share
one set of head/tail modules: before each step the client's own adapter values are loaded into
them, and each client keeps its own optimizer, so this equals separate copies.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.client.runner import client_adapters, data_order, load_client_adapters
from fedsplit.data import Example, collate, encode_examples
from fedsplit.server import TrunkServer
from fedsplit.split import SplitParts, split_model
from fedsplit.split.prefix import add_part_prefixes
from fedsplit.strategy import ClientUpdate, FedAvg, TooFewResults
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import schedule_horizon

Batch = dict[str, torch.Tensor]


def silo_batches(silo: Sequence[Example], tokenizer, cfg: TrainConfig) -> list[Batch]:
    """One client's examples, tokenized, shuffled by the seed and cut into full micro-batches
    (as ``fedsplit.recipes.network.client_batches``)."""
    encoded = encode_examples(silo, tokenizer, cfg.max_length)
    random.Random(cfg.seed).shuffle(encoded)
    size = cfg.batch_size
    batches = [collate(encoded[i : i + size], tokenizer.pad_token_id, cfg.padding_side)
               for i in range(0, len(encoded) - size + 1, size)]
    if not batches:
        raise ValueError(f"a client has {len(silo)} examples, fewer than one batch of {size}")
    return batches


def round_steps(batches: Sequence[Batch], cfg: TrainConfig, first_step: int, local_steps: int) -> list[list[Batch]]:
    """The micro-batches of a client's ``local_steps`` optimizer steps from ``first_step`` on."""
    accum = cfg.grad_accum
    order = data_order(len(batches), cfg.seed, first_step * accum, local_steps * accum)
    micro = [batches[i] for i in order]
    return [micro[i : i + accum] for i in range(0, len(micro), accum)]


def train_federated(
    model: torch.nn.Module,
    silos: Sequence[Sequence[Batch]],
    cfg: TrainConfig,
    lora: Sequence[LoraSettings],
    *,
    rounds: int,
    local_steps: int,
    head_layers: int = 1,
    tail_layers: int = 1,
    progress: bool = True,
    wire_dtype: torch.dtype | None = None,
    prefix_tokens: int = 0,
) -> tuple[SplitParts, list[float]]:
    """Federated split LoRA training of ``model`` (cut in place); returns its parts, holding the final
    global adapters (so ``model`` itself is the merged result), and every client step's loss.
    ``wire_dtype``: hidden states and gradients cross the cut in it (``[wire] dtype``; None: as computed).
    ``prefix_tokens`` > 0: P-tuning v2 prefixes instead of LoRA (``[method]``); the head/tail prefixes are
    FedAvg'd like the LoRA weights, the trunk's stay on the server."""
    parts = split_model(model, head_layers, tail_layers)
    if prefix_tokens:
        add_part_prefixes(parts, prefix_tokens, seed=cfg.seed)
    else:
        add_part_adapters(parts, lora, seed=cfg.seed)
    ids = [f"client-{k}" for k in range(len(silos))]
    server = TrunkServer(parts.trunk, cfg, schedule_horizon(rounds, local_steps, len(ids)), wire_dtype=wire_dtype)
    channels = {cid: _channel(server, cid) for cid in ids}
    strategy = FedAvg(local_steps=local_steps, lr=cfg.lr, seed=cfg.seed)
    global_adapters = client_adapters(parts.head, parts.tail)
    steps_done = {cid: 0 for cid in ids}
    losses: list[float] = []
    bar = tqdm(total=rounds * local_steps * len(ids), desc="federated split", unit="step", disable=not progress)
    for number in range(1, rounds + 1):
        plan = strategy.configure_round(number, ids)
        client_cfg = dataclasses.replace(cfg, lr=float(plan.settings["lr"]))
        clients, states, work = {}, {}, {}
        for index, cid in enumerate(ids):
            if cid not in plan.client_ids:
                continue
            clients[cid] = SplitClient(parts.head, parts.tail, channels[cid], client_cfg,
                                       schedule_horizon(rounds, local_steps), wire_dtype=wire_dtype)
            clients[cid].round, clients[cid].steps_taken = number, steps_done[cid]  # fresh AdamW, schedule position
            states[cid] = global_adapters
            work[cid] = round_steps(silos[index], cfg, steps_done[cid], local_steps)
        round_losses: dict[str, list[float]] = {cid: [] for cid in clients}
        for step in range(local_steps):
            for cid in plan.client_ids:  # sorted ids: the coordinator's turn order
                load_client_adapters(parts.head, parts.tail, states[cid])
                result = clients[cid].train_step(work[cid][step])
                states[cid] = client_adapters(parts.head, parts.tail)
                round_losses[cid].append(result.loss)
                losses.append(result.loss)
                bar.update()
        updates = [ClientUpdate(cid, states[cid], num_examples=_examples(work[cid]),
                                metrics={"loss": sum(round_losses[cid]) / local_steps}) for cid in plan.client_ids]
        aggregate = strategy.aggregate(number, updates, [], global_adapters)
        if isinstance(aggregate, TooFewResults):  # every picked client trained: the strategy wants more
            raise RuntimeError(aggregate.reason)
        global_adapters = aggregate.tensors
        for cid in plan.client_ids:
            steps_done[cid] += local_steps
        bar.set_postfix(round=number, loss=f"{losses[-1]:.3f}")
    bar.close()
    load_client_adapters(parts.head, parts.tail, global_adapters)
    return parts, losses


def _channel(server: TrunkServer, cid: str):
    channel, _ = in_process_channel(cid, lambda kind, rnd, step, msg: server.handle(cid, kind, rnd, step, msg))
    return channel


def _examples(steps: Sequence[Sequence[Batch]]) -> int:
    return sum(int(batch["input_ids"].shape[0]) for micro in steps for batch in micro)
