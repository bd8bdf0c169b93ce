"""Split-step overhead: split LoRA step (in-process channel, full serialization) over the monolithic one.

SmolLM2-135M-Instruct, batch 4 x 128 tokens, LoRA r=8 on every part, same thread count.
Steps of the two modes are interleaved so machine noise hits both alike; medians are compared.
Prints one JSON line last: {"bench": "split_overhead", "ratio": ..., "split_s": ..., "monolithic_s": ...}
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.models import load_model
from fedsplit.recipes.local import local_split
from fedsplit.split import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig

from benchlib import random_batch, step_parser


def main() -> None:
    args = step_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)

    base, _ = load_model(args.model)
    cfg = TrainConfig(lr=1e-4, schedule="constant")
    total = args.steps + args.warmup
    local = local_split(copy.deepcopy(base), cfg, total)
    channel, client = local.channel, local.client
    mono = copy.deepcopy(base)
    mono_parts = split_model(mono, 1, 1)
    add_part_adapters(mono_parts, [LoraSettings()] * 3)
    trainer = CentralizedTrainer(mono, [p for part in mono_parts for p in trainable_parameters(part)], cfg, total)

    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    times: dict[str, list[float]] = {"split": [], "monolithic": []}
    for step in range(total):
        batch = random_batch(g, vocab, args.batch, args.seq)
        for name, run in (("split", client.train_step), ("monolithic", trainer.train_step)):
            start = time.perf_counter()
            run([batch])
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    split_s, mono_s = statistics.median(times["split"]), statistics.median(times["monolithic"])
    raw = 4 * args.batch * args.seq * base.config.hidden_size * 4  # hidden + grads at both cuts, fp32
    print(f"split steps {[f'{t:.3f}' for t in times['split']]}")
    print(f"mono  steps {[f'{t:.3f}' for t in times['monolithic']]}")
    print(json.dumps({
        "bench": "split_overhead", "ratio": round(split_s / mono_s, 4), "split_s": round(split_s, 4),
        "monolithic_s": round(mono_s, 4), "model": args.model, "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "steps": args.steps, "raw_tensor_bytes_per_step": raw,
        "channel_bytes_per_step": (channel.stats.bytes_sent + channel.stats.bytes_received) // total,
    }))


if __name__ == "__main__":
    main()
