"""The most client-batching can gain on this machine: one trunk pass over N clients' rows vs N passes.

No server, no transport, no optimizer: the SmolLM2 trunk (blocks p..N-q-1 with LoRA) runs forward
and backward over ``clients`` sequences of ``seq`` tokens, once as N passes of one row and once as
one pass of N rows; the two are interleaved and repeated. Their ratio bounds the speedup any
client-batching server can reach over a sequential one at the same thread count (FL-GLM's
client-batching, arXiv 2406.14898 Sec. 3.3; ``bench/server_throughput.py`` measures the real server).

Prints one JSON line last: ``{"bench": "batching_ceiling", "ceiling": median ratio, ...}``.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.models import load_model
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask

from benchlib import step_parser, summary


def main() -> dict:
    parser = step_parser(__doc__)
    parser.add_argument("--clients", type=int, default=4, help="rows batched into one pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load_model(args.model)
    parts = split_model(model, 2, 2)
    add_part_adapters(parts, [LoraSettings()] * 3)
    trunk = parts.trunk
    hidden_size = int(model.config.hidden_size)

    def step(rows: int) -> None:
        hidden = torch.randn(rows, args.seq, hidden_size, requires_grad=True)
        mask = torch.ones(rows, args.seq, dtype=torch.long)
        out = trunk(hidden, mask, positions_from_mask(mask))  # (rows, seq, H)
        out.backward(torch.randn_like(out))

    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    for repeat in range(args.warmup + args.steps):
        for name, run in (("one_by_one", lambda: [step(1) for _ in range(args.clients)]),
                          ("batched", lambda: step(args.clients))):
            start = time.perf_counter()
            run()
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["one_by_one"], times["batched"], strict=True)]
    result = {"bench": "batching_ceiling", "ceiling": round(statistics.median(ratios), 4),
              "ratio_spread": {k: round(v, 4) for k, v in summary(ratios).items()},
              "one_by_one_s": round(statistics.median(times["one_by_one"]), 4),
              "batched_s": round(statistics.median(times["batched"]), 4),
              "model": args.model, "clients": args.clients, "seq": args.seq, "threads": args.threads,
              "repeats": args.steps}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
