"""Parallel training on the server: FedSEA-LLaMA's Table 7 protocol (arXiv 2505.15683) at small scale.

The same samples, 2 and 4 clients, each mode run as real processes over gRPC with TLS + AES-GCM:
  sequential      one trunk serves one client step at a time (server: 1 torch thread)
  client-batch    concurrent clients' requests in one trunk pass (server: 1 torch thread)
  hierarchical    K sub-servers (1 thread each) serve client groups in parallel, averaged with
                  torch.distributed all-reduce; K = 2 is compared with K = 1.
SmolLM2-135M LoRA, every client batch 1 (so batching is what the server adds), clients 1 thread.
Reports training wall time (first round start -> run done, from the server's metrics), speed-up
over sequential, peak RSS and PSS summed over the server processes (root + sub-servers), and
each mode's final held-out loss (merged adapter in the unsplit model).
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import replace
from pathlib import Path

import psutil

from fedsplit.config import RunConfig
from fedsplit.metrics import read_metrics
from fedsplit.recipes.network import _spawn, free_port, write_federation


def _config(args, clients: int, mode: str, subservers: int = 1) -> RunConfig:
    cfg = RunConfig()
    return replace(
        cfg,
        model=replace(cfg.model, name=args.model),
        train=replace(cfg.train, batch_size=1, max_length=128, lr=1e-4, schedule="constant", max_grad_norm=1.0),
        data=replace(cfg.data, num_clients=clients, max_eval_examples=args.eval_examples),
        federation=replace(cfg.federation, rounds=args.rounds, local_steps=args.samples // clients // args.rounds,
                           min_clients=clients),
        server=replace(cfg.server, address=f"127.0.0.1:{free_port()}", mode=mode, threads=1, join_grace_s=600.0,
                       join_timeout_s=900.0),
        client=replace(cfg.client, threads=1),
        hierarchy=replace(cfg.hierarchy, subservers=subservers, threads=1, sync_every=args.sync_every),
    )


class MemoryWatch:
    """Peak RSS and PSS summed over a process and its children, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                infos = [p.memory_full_info() for p in procs if p.is_running()]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.peak_rss = max(self.peak_rss, sum(i.rss for i in infos))
            self.peak_pss = max(self.peak_pss, sum(i.pss for i in infos))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(args, out: Path, clients: int, mode: str, subservers: int = 1) -> dict:
    cfg = _config(args, clients, mode, subservers)
    server_toml, client_tomls = write_federation(cfg, out)
    server = _spawn(["server", "--config", str(server_toml), "--out", str(out / "server")], out / "logs" / "server.log")
    watch = MemoryWatch(server.pid)
    procs = [server] + [_spawn(["client", "--config", str(p), "--out", str(out / p.stem)],
                               out / "logs" / f"{p.stem}.log")
                        for p in client_tomls]
    codes = [p.wait(timeout=args.timeout) for p in procs]
    watch.stop()
    if any(codes):
        raise RuntimeError(f"{mode} with {clients} clients failed ({codes}); logs in {out / 'logs'}")
    metrics = out / "server" / "metrics.jsonl"
    start = read_metrics(metrics, "round_start")[0]["time"]
    done = read_metrics(metrics, "run_done")[0]["time"]
    return {"seconds": done - start, "peak_rss_mb": watch.peak_rss / 2**20, "peak_pss_mb": watch.peak_pss / 2**20,
            "loss": heldout_loss(cfg, out / "server" / "adapters" / "merged"), "samples": args.samples}


def heldout_loss(cfg: RunConfig, adapter: Path) -> float:
    from peft import PeftModel

    from fedsplit.models import load_model
    from fedsplit.recipes.common import encode, eval_batches, load_federated_data
    from fedsplit.recipes.evaluate import heldout_loss as loss_of

    base, tokenizer = load_model(cfg.model.name)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    data = load_federated_data(cfg.data, cfg.train.seed)
    return loss_of(model, eval_batches(encode(data.eval, tokenizer, cfg), 8, tokenizer.pad_token_id, "right"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32, help="training samples in every mode (all clients)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-parallel"))
    args = parser.parse_args()

    runs = {
        "sequential_2": (2, "sequential", 1), "client_batch_2": (2, "client-batch", 1),
        "sequential_4": (4, "sequential", 1), "client_batch_4": (4, "client-batch", 1),
        "hierarchical_k1_2": (2, "hierarchical", 1), "hierarchical_k2_2": (2, "hierarchical", 2),
    }
    results = {}
    for name, (clients, mode, k) in runs.items():
        results[name] = run_mode(args, args.out / name, clients, mode, k)
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}
        print(name, json.dumps(rounded), flush=True)

    def speedup(base: str, other: str) -> float:
        return round(results[base]["seconds"] / results[other]["seconds"], 3)

    losses = {name: r["loss"] for name, r in results.items()}
    gaps = [abs(losses[n] / losses[f"sequential_{n[-1]}"] - 1) * 100 for n in losses if not n.startswith("sequential")]
    k1, k2 = results["hierarchical_k1_2"], results["hierarchical_k2_2"]
    print(json.dumps({
        "bench": "parallel_training",
        "client_batch_speedup_2": speedup("sequential_2", "client_batch_2"),
        "client_batch_speedup_4": speedup("sequential_4", "client_batch_4"),
        "hierarchical_speedup_2": speedup("hierarchical_k1_2", "hierarchical_k2_2"),
        "hierarchical_over_sequential_2": speedup("sequential_2", "hierarchical_k2_2"),
        "server_rss_ratio_2": round(k2["peak_rss_mb"] / k1["peak_rss_mb"], 3),
        "server_pss_ratio_2": round(k2["peak_pss_mb"] / k1["peak_pss_mb"], 3),
        "max_loss_gap_pct": round(max(gaps), 3),
        "seconds": {n: round(r["seconds"], 2) for n, r in results.items()},
        "peak_rss_mb": {n: round(r["peak_rss_mb"]) for n, r in results.items()},
        "peak_pss_mb": {n: round(r["peak_pss_mb"]) for n, r in results.items()},
        "heldout_loss": {n: round(v, 5) for n, v in losses.items()},
        "model": args.model, "samples": args.samples, "client_batch": 1, "threads": "server/sub-server 1, clients 1",
    }))


if __name__ == "__main__":
    main()
