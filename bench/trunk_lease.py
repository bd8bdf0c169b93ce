"""The trunk lease behind a slow link, in process (FL-GLM, arXiv 2406.14898; docs/parallel.md "The trunk lease").

K clients train one semi-synchronous round (round-robin turns off) of ``local_steps`` split steps
through the real round coordinator and ``TrunkServer`` over the in-process channel (every message
serialized as on the network). client-0 sleeps ``--delay`` seconds before every BACKWARD and
OPTIMIZER_STEP it sends: the round trips inside a step, which ``trunk_lease = "step"`` holds the
trunk through. For each lease: when the other clients' updates arrived and when client-0's did
(seconds after the round started), and the committed trunk steps by staleness (``"pass"``). The
leases alternate within each repeat; medians over ``--repeats``.

    python bench/trunk_lease.py                                   # tiny-llama, 3 clients, 0.15 s
    python bench/trunk_lease.py --model smollm2-135m --batch 1 --seq 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.channel import Channel, InProcessTransport, ServerSession
from fedsplit.client.runner import ClientRunner, client_adapters
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.models import load_model
from fedsplit.protocol import pb
from fedsplit.server import TrunkServer
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator
from fedsplit.split import SplitParts, split_model
from fedsplit.strategy import FedAvg
from fedsplit.train.config import TrainConfig

from benchlib import random_batch


class SlowRoundTrips:
    """A transport that waits ``delay_s`` before every BACKWARD and OPTIMIZER_STEP leaves."""

    def __init__(self, inner: InProcessTransport, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def exchange(self, frame: bytes) -> bytes:
        if pb.Frame.FromString(frame).kind in (pb.BACKWARD, pb.OPTIMIZER_STEP):
            time.sleep(self.delay_s)
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


def build_parts(model_name: str) -> SplitParts:
    model, _ = load_model(model_name)
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings(r=8)] * 3, seed=0)
    return parts


def run_once(args: argparse.Namespace, lease: str, workdir: Path) -> dict:
    """One round with ``lease``; seconds from round start to each update, and the staleness counts."""
    cfg = TrainConfig(lr=1e-3, max_length=args.seq)
    ids = [f"client-{k}" for k in range(args.clients)]
    server = build_parts(args.model)
    trunk = TrunkServer(server.trunk, cfg, total_steps=args.local_steps * args.clients, lease=lease)
    metrics = MetricsWriter(workdir / f"{lease}.jsonl")
    coordinator = RoundCoordinator(
        trunk, FedAvg(local_steps=args.local_steps, lr=cfg.lr, min_clients=args.clients),
        client_adapters(server.head, server.tail), ids,
        CoordinatorConfig(num_rounds=1, ordered_steps=False, join_grace_s=0.5, poll_s=0.01), metrics=metrics,
    )
    vocab = int(server.trunk.config.vocab_size)
    runners = []
    for index, cid in enumerate(ids):
        parts = build_parts(args.model)
        g = torch.Generator().manual_seed(index)
        batches = [random_batch(g, vocab, args.batch, args.seq) for _ in range(args.local_steps)]

        def connect(cid: str = cid, slow: bool = index == 0) -> Channel:
            transport = InProcessTransport(ServerSession(cid, coordinator.handler_for(cid)))
            return Channel(SlowRoundTrips(transport, args.delay) if slow else transport)

        runners.append(ClientRunner(cid, parts.head, parts.tail, batches, cfg, connect))
    threads = [threading.Thread(target=runner.run, daemon=True) for runner in runners]
    with metrics:
        for thread in threads:
            thread.start()
        coordinator.run()
    for thread in threads:
        thread.join(60)
    start = read_metrics(workdir / f"{lease}.jsonl", "round_start")[0]["time"]
    arrived = {r["client"]: r["time"] - start for r in read_metrics(workdir / f"{lease}.jsonl", "client_update")}
    return {"slow_s": arrived.pop(ids[0]), "others_s": max(arrived.values()),
            "staleness": dict(trunk.passes.staleness) if trunk.passes is not None else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.15, help="client-0's wait before BACKWARD / OPTIMIZER_STEP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict]] = {"step": [], "pass": []}
    for repeat in range(args.repeats):
        for lease in ("step", "pass") if repeat % 2 == 0 else ("pass", "step"):
            with tempfile.TemporaryDirectory() as tmp:  # a fresh metrics file per run
                runs[lease].append(run_once(args, lease, Path(tmp)))
    summary = {}
    for lease, results in runs.items():
        staleness: Counter[int] = Counter()
        for result in results:
            staleness.update(result["staleness"])
        summary[lease] = {"others_done_s": statistics.median(r["others_s"] for r in results),
                          "slow_done_s": statistics.median(r["slow_s"] for r in results),
                          "staleness": dict(sorted(staleness.items())),
                          "runs": [{"others_s": round(r["others_s"], 3), "slow_s": round(r["slow_s"], 3)}
                                   for r in results]}
        print(f"{lease:>4}: other clients done {summary[lease]['others_done_s']:.2f} s, client-0 done "
              f"{summary[lease]['slow_done_s']:.2f} s, committed steps by staleness {summary[lease]['staleness']}")
    print(json.dumps({"settings": vars(args), **summary}))


if __name__ == "__main__":
    main()
