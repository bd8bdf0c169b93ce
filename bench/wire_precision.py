"""Half-precision wire: bytes per split step and held-out loss after a short federated run, per wire dtype.

FL-GLM (arXiv 2406.14898) ships hidden states and their gradients at every step; ``[wire] dtype``
sends them as bf16 or fp16 while each side computes in fp32. For each dtype this runs the
in-process federation (``fedsplit.recipes.inprocess.train_federated``: the network run's math, every
message serialized) on the demo's stdlib-docs silos from the same start, then scores the merged
model on the demo's held-out set. Bytes per step are the channel's frames (both directions:
FORWARD, BACKWARD, OPTIMIZER_STEP and their replies) of one split step on a real batch.

Prints one JSON line last: {"bench": "wire_precision", "bytes_ratio": bf16/fp32, "loss_gap_pct": ..., ...}
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.config import DataConfig
from fedsplit.data import encode_examples
from fedsplit.models import load_model
from fedsplit.protocol.precision import wire_dtype
from fedsplit.recipes.common import eval_batches, load_federated_data
from fedsplit.recipes.evaluate import heldout_loss
from fedsplit.recipes.inprocess import silo_batches, train_federated
from fedsplit.server import TrunkServer
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig


def bytes_per_step(base: torch.nn.Module, batch: dict, cfg: TrainConfig, wire: torch.dtype) -> int:
    """Frame bytes (sent + received) of one split training step with ``wire``."""
    parts = split_model(copy.deepcopy(base), 1, 1)
    add_part_adapters(parts, [LoraSettings()] * 3, seed=cfg.seed)
    server = TrunkServer(parts.trunk, cfg, 1, wire_dtype=wire)
    channel, _ = in_process_channel("c", lambda k, r, s, m: server.handle("c", k, r, s, m))
    SplitClient(parts.head, parts.tail, channel, cfg, 1, wire_dtype=wire).train_step([batch])
    return channel.stats.bytes_sent + channel.stats.bytes_received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="wire dtypes; the first is the reference")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_model(args.model)
    cfg = TrainConfig()  # the demo's optimization: lr 2e-4 cosine, batch 4 x 128 tokens, fp32 compute
    data = load_federated_data(DataConfig(num_clients=args.clients), cfg.seed)
    silos = [silo_batches(silo, tokenizer, cfg) for silo in data.silos]
    held_out = eval_batches(encode_examples(data.eval, tokenizer, cfg.max_length), 2 * cfg.batch_size,
                            tokenizer.pad_token_id, cfg.padding_side)
    results: dict[str, dict] = {}
    for label in args.dtypes.split(","):
        wire = wire_dtype(label)
        start = time.perf_counter()
        model = copy.deepcopy(base)
        _, losses = train_federated(model, silos, cfg, [LoraSettings()] * 3, rounds=args.rounds,
                                    local_steps=args.local_steps, progress=False, wire_dtype=wire)
        with torch.no_grad():
            loss = heldout_loss(model, held_out)
        results[label] = {"heldout_loss": loss, "final_train_loss": losses[-1],
                          "bytes_per_step": bytes_per_step(base, silos[0][0], cfg, wire),
                          "seconds": round(time.perf_counter() - start, 1)}
        print(label, json.dumps(results[label]), flush=True)
    reference, *others = list(results)
    half = "bf16" if "bf16" in results else others[0]
    ref = results[reference]
    print(json.dumps({
        "bench": "wire_precision", "model": args.model, "rounds": args.rounds, "local_steps": args.local_steps,
        "clients": args.clients, "steps": args.rounds * args.local_steps * args.clients,
        "bytes_ratio": round(results[half]["bytes_per_step"] / ref["bytes_per_step"], 4),
        "loss_gap_pct": round(100 * (results[half]["heldout_loss"] - ref["heldout_loss"]) / ref["heldout_loss"], 4),
        "half": half, "per_dtype": results,
        **{f"loss_gap_pct_{label}": round(100 * (r["heldout_loss"] - ref["heldout_loss"]) / ref["heldout_loss"], 4)
           for label, r in results.items() if label != reference},
    }))


if __name__ == "__main__":
    main()
