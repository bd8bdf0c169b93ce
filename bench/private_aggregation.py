"""Private aggregation cost: plain FedAvg vs secure aggregation, CKKS and hybrid, per round.

10 clients upload updates with the real SmolLM2-135M client-part adapter shapes (random values):
``default`` is LoRA r=8 on q,v of p=q=1 head/tail blocks, ``large`` r=16 on every linear layer
of p=q=2. Every party runs in this process (`fedsplit.aggregation.rounds.run_round`); per mode we
report each client's CPU seconds (its own work: encode, mask/encrypt, unmask/decrypt), the server's
CPU seconds, the bytes each client uploads, and the largest error against float64 FedAvg.

Overhead per round = (mean client CPU s + server CPU s) of the mode minus that of plain FedAvg,
over the wall time of a demo-sized round (``--round-seconds``, default 8 local steps x 2.5 s = 20 s
of training per client; ``--measure-step`` times one real SmolLM2 LoRA step at 4 x 128 to ground
it). CPU seconds, not wall seconds, because clients run in parallel on their own machines and this
machine is shared. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.adapters import LoraSettings, adapter_state_dict, add_part_adapters
from fedsplit.aggregation.ckks import CkksParams
from fedsplit.aggregation.hybrid import default_policy, sensitivity_policy, update_sensitivity
from fedsplit.aggregation.rounds import RoundReport, run_round, setup_ckks
from fedsplit.aggregation.secagg import SecAggParams
from fedsplit.models import load_model
from fedsplit.split import split_model
from fedsplit.strategy import ClientUpdate

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {  # name -> (head/tail blocks, LoRA settings)
    "default": (1, LoraSettings(r=8)),
    "large": (2, LoraSettings(r=16, target_modules=ALL_LINEAR)),
}


def adapter_shapes(model_name: str, blocks: int, lora: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Shapes of the client parts' adapter tensors ("head/...", "tail/...") of the real model."""
    model, _ = load_model(model_name)
    head, trunk, tail = split_model(model, head_layers=blocks, tail_layers=blocks)
    add_part_adapters([head, trunk, tail], [lora] * 3)
    shapes = {f"head/{k}": tuple(v.shape) for k, v in adapter_state_dict(head).items()}
    shapes.update({f"tail/{k}": tuple(v.shape) for k, v in adapter_state_dict(tail).items()})
    return shapes


def random_updates(shapes: dict[str, tuple[int, ...]], clients: int, seed: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"client-{i}", {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()},
                     int(torch.randint(16, 64, (1,), generator=gen)), {})
        for i in range(clients)
    ]


def fedavg64(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in updates)
    out = {}
    for k in updates[0].tensors:
        acc = torch.zeros(updates[0].tensors[k].shape, dtype=torch.float64)
        for u in updates:
            acc += u.tensors[k].double() * u.num_examples
        out[k] = acc / total
    return out


def summarize(report: RoundReport, exact: dict[str, torch.Tensor], wall: float) -> dict[str, float]:
    error = max(float((report.tensors[k].double() - exact[k]).abs().max()) for k in exact)
    client_s = statistics.mean(report.client_seconds.values())
    return {
        "client_cpu_s": round(client_s, 4),
        "server_cpu_s": round(report.server_seconds, 4),
        "round_cpu_s": round(client_s + report.server_seconds, 4),
        "wall_s_all_parties": round(wall, 3),
        "upload_bytes_per_client": int(statistics.mean(report.upload_bytes.values())),
        "max_error_vs_fedavg": error,
        "error_bound": report.error_bound,
        "clients": len(report.clients),
    }


def measure_step(model_name: str) -> float:
    """Wall seconds of one SmolLM2 LoRA training step at batch 4 x 128 (the second of two)."""
    model, _ = load_model(model_name)
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings()] * 3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - start
    return seconds


def encrypt_parallelism(session, vector: np.ndarray, workers: int) -> dict[str, float]:
    """Wall seconds to encrypt one client's vector: serial, a thread pool, a process pool."""
    client = next(iter(session.clients.values()))
    out = {}
    start = time.perf_counter()
    client.encrypt(vector, 1)
    out["serial"] = time.perf_counter() - start
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        client.encrypt(vector, 1, executor=pool)
        out[f"thread{workers}"] = time.perf_counter() - start
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(abs, range(workers)))  # start the workers outside the timing
        client.encrypt(vector[: session.params.slots], 1, executor=pool)  # and load the context
        start = time.perf_counter()
        client.encrypt(vector, 1, executor=pool)
        out[f"process{workers}"] = time.perf_counter() - start
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--configs", default="default,large")
    parser.add_argument("--round-seconds", type=float, default=20.0, help="demo round: 8 steps x 2.5 s")
    parser.add_argument("--measure-step", action="store_true", help="time one real SmolLM2 LoRA step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    secagg = SecAggParams(threshold=args.clients // 2 + 1)
    ckks_params = CkksParams()
    results: dict[str, dict] = {}
    for config in args.configs.split(","):
        blocks, lora = CONFIGS[config]
        shapes = adapter_shapes(args.model, blocks, lora)
        updates = random_updates(shapes, args.clients, seed=0)
        exact = fedavg64(updates)
        identities = {u.client_id: ed25519.Ed25519PrivateKey.generate() for u in updates}
        start = time.perf_counter()
        session = setup_ckks([u.client_id for u in updates], identities, ckks_params, run_id="bench")
        row: dict = {"params_per_client": sum(int(np.prod(s)) for s in shapes.values()), "tensors": len(shapes),
                     "ckks_setup_s": round(time.perf_counter() - start, 3),
                     "ckks_setup_bytes_key_holder": max(session.setup_bytes.values())}
        names = list(shapes)
        runs: dict[str, dict[str, Any]] = {
            "plain": {"mode": "plain"},
            "secagg": {"mode": "secagg", "secagg": secagg},
            "ckks": {"mode": "ckks", "ckks": session},
            "hybrid": {"mode": "hybrid", "secagg": secagg, "policy": default_policy(names, "secagg")},
            "hybrid_ckks": {"mode": "hybrid", "ckks": session, "policy": default_policy(names, "ckks")},
            # ranked by the RMS of a global update (here: the random round's FedAvg vs zero), top half encrypted
            "hybrid_top50": {"mode": "hybrid", "secagg": secagg, "policy": sensitivity_policy(
                update_sensitivity({k: torch.zeros_like(v) for k, v in exact.items()}, exact),
                {k: int(np.prod(s)) for k, s in shapes.items()}, 0.5, "secagg")},
        }
        for name, kwargs in runs.items():
            mode = kwargs.pop("mode")
            start = time.perf_counter()
            report = run_round(mode, updates, identities=identities, run_id="bench", round=1, **kwargs)
            row[name] = summarize(report, exact, time.perf_counter() - start)
        encrypted = default_policy(names).partition(names).get("secagg", [])
        row["hybrid_encrypted_fraction"] = round(  # p = q = 1: the tail's last block is the whole tail
            sum(int(np.prod(shapes[n])) for n in encrypted) / row["params_per_client"], 4)
        vector = np.random.default_rng(0).normal(0, 0.02, row["params_per_client"] + 1)
        row["ckks_encrypt_wall_s"] = encrypt_parallelism(session, vector, 2)
        results[config] = row
        print(json.dumps({"config": config, **row}), flush=True)

    step_s = measure_step(args.model) if args.measure_step else None
    base = results.get("default") or next(iter(results.values()))

    def overhead(row: dict, mode: str) -> float:
        return round(100 * (row[mode]["round_cpu_s"] - row["plain"]["round_cpu_s"]) / args.round_seconds, 3)

    def ratio(row: dict, mode: str) -> float:
        return round(row[mode]["upload_bytes_per_client"] / row["plain"]["upload_bytes_per_client"], 3)

    def saved(row: dict, full: str, hybrid: str, key: str) -> float:
        return round(100 * (1 - row[hybrid][key] / row[full][key]), 2)

    summary = {
        "bench": "private_aggregation",
        "clients": args.clients,
        "round_seconds_baseline": args.round_seconds,
        "round_seconds_baseline_source": "assumed: 8 local steps x 2.5 s per SmolLM2 LoRA step (demo round)",
        "measured_step_seconds": None if step_s is None else round(step_s, 3),
        "overhead_measure": "mean client CPU s + server CPU s per round, minus plain FedAvg's, / baseline",
        "secagg_overhead_pct": overhead(base, "secagg"),
        "ckks_overhead_pct": overhead(base, "ckks"),
        "hybrid_overhead_pct": overhead(base, "hybrid"),
        "hybrid_ckks_overhead_pct": overhead(base, "hybrid_ckks"),
        "hybrid_top50_overhead_pct": overhead(base, "hybrid_top50"),
        "hybrid_encrypted_fraction": base["hybrid_encrypted_fraction"],
        "secagg_upload_ratio": ratio(base, "secagg"),
        "ckks_upload_ratio": ratio(base, "ckks"),
        "hybrid_upload_ratio": ratio(base, "hybrid"),
        "hybrid_bytes_saved_vs_secagg_pct": saved(base, "secagg", "hybrid", "upload_bytes_per_client"),
        "hybrid_seconds_saved_vs_secagg_pct": saved(base, "secagg", "hybrid", "round_cpu_s"),
        "hybrid_ckks_bytes_saved_vs_ckks_pct": saved(base, "ckks", "hybrid_ckks", "upload_bytes_per_client"),
        "hybrid_ckks_seconds_saved_vs_ckks_pct": saved(base, "ckks", "hybrid_ckks", "round_cpu_s"),
        "hybrid_top50_bytes_saved_vs_secagg_pct": saved(base, "secagg", "hybrid_top50", "upload_bytes_per_client"),
        "max_error_vs_fedavg": max(r[m]["max_error_vs_fedavg"] for r in results.values()
                                   for m in ("plain", "secagg", "ckks", "hybrid", "hybrid_ckks", "hybrid_top50")),
    }
    if "large" in results and base is not results["large"]:
        large = results["large"]
        summary.update({
            "large_secagg_overhead_pct": overhead(large, "secagg"),
            "large_ckks_overhead_pct": overhead(large, "ckks"),
            "large_hybrid_overhead_pct": overhead(large, "hybrid"),
            "large_hybrid_encrypted_fraction": large["hybrid_encrypted_fraction"],
            "large_hybrid_bytes_saved_vs_secagg_pct": saved(large, "secagg", "hybrid", "upload_bytes_per_client"),
            "large_hybrid_seconds_saved_vs_secagg_pct": saved(large, "secagg", "hybrid", "round_cpu_s"),
            "large_hybrid_ckks_bytes_saved_vs_ckks_pct": saved(large, "ckks", "hybrid_ckks", "upload_bytes_per_client"),
            "large_hybrid_ckks_seconds_saved_vs_ckks_pct": saved(large, "ckks", "hybrid_ckks", "round_cpu_s"),
            "large_secagg_upload_ratio": ratio(large, "secagg"),
        })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
