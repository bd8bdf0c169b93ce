"""Many concurrent clients against one server (arXiv 2503.12226's cross-cloud setting, issue 10).

For each client count N (default 8, 16, 32, 64): one ``fedsplit server`` process (sequential mode,
TLS, sealed sessions: the real server) and ONE client process holding N client sessions, each a
real :class:`~fedsplit.client.runner.ClientRunner` in its own thread with its own head and tail of
a tiny model, its own identity and its own silo of the stdlib-docs data. Every round must
include every client (``min_clients = N``). While the run goes, the server process's thread count
and resident memory are sampled; the time per round comes from the server's ``metrics.jsonl``
(``round_start`` to ``round_end``).

What it shows: every round completes with N clients, and the server's threads and memory are
bounded (its gRPC pool holds at most ``2 N + 4`` authenticated streams plus the handshake slots,
see :mod:`fedsplit.transport.grpc_server`). The trunk serves one client step at a time in
sequential mode, so the time per round grows linearly in N by design.

Prints one JSON line last: ``{"bench": "many_clients", "rows": [{"clients": N, "rounds_completed": ...,
"round_s": ..., "server_threads_max": ..., "server_rss_mb_max": ...}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from fedsplit.config import RunConfig


def _config(clients: int, rounds: int, port: int) -> RunConfig:
    cfg = RunConfig()
    return replace(
        cfg,
        model=replace(cfg.model, name="tiny-llama", head_layers=1, tail_layers=1),
        train=replace(cfg.train, batch_size=2, max_length=64, lr=1e-3),
        data=replace(cfg.data, num_clients=clients, partition="iid", max_eval_examples=8),
        federation=replace(cfg.federation, rounds=rounds, local_steps=1, min_clients=clients),
        server=replace(cfg.server, address=f"127.0.0.1:{port}", threads=1, join_grace_s=0.5, join_timeout_s=300.0),
        client=replace(cfg.client, threads=1),
    )


def _clients(tomls: list[Path], out: Path) -> None:
    """Run every client of ``tomls`` in this process, one thread each (the ``--clients-of`` mode)."""
    import torch

    from fedsplit.configio import load_config
    from fedsplit.recipes.network import run_client

    torch.set_num_threads(1)
    errors: list[str] = []

    def one(path: Path) -> None:
        try:
            run_client(load_config(RunConfig, path), path.parent, out / path.stem)
        except Exception as exc:  # noqa: BLE001 - reported below, the other clients go on
            errors.append(f"{path.stem}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(p,), name=p.stem) for p in tomls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("clients failed: " + "; ".join(errors))


def run(clients: int, rounds: int, out: Path, timeout_s: float) -> dict:
    from fedsplit.metrics import read_metrics
    from fedsplit.recipes.network import free_port, write_federation

    cfg = _config(clients, rounds, free_port())
    server_toml, client_tomls = write_federation(cfg, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "server.log", "w") as server_log, open(logs / "clients.log", "w") as clients_log:
        serve = ["server", "--config", str(server_toml), "--out", str(out / "server")]
        server = subprocess.Popen([sys.executable, "-m", "fedsplit.cli", *serve],
                                  stdout=server_log, stderr=subprocess.STDOUT, env=env)
        client_proc = subprocess.Popen(
            [sys.executable, __file__, "--clients-of", str(out), *map(str, client_tomls)],
            stdout=clients_log, stderr=subprocess.STDOUT, env=env)
        watched = psutil.Process(server.pid)
        threads_max, rss_max = 0, 0
        deadline = time.monotonic() + timeout_s
        while server.poll() is None and time.monotonic() < deadline:
            try:
                threads_max = max(threads_max, watched.num_threads())
                rss_max = max(rss_max, watched.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.2)
        for proc in (server, client_proc):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    metrics = out / "server" / "metrics.jsonl"
    starts = {r["round"]: r["time"] for r in read_metrics(metrics, "round_start")} if metrics.exists() else {}
    ends = {r["round"]: r["time"] for r in read_metrics(metrics, "round_end")} if metrics.exists() else {}
    durations = [ends[k] - starts[k] for k in sorted(ends) if k in starts]
    return {
        "clients": clients,
        "rounds_completed": len(ends),
        "rounds": rounds,
        "server_exit": server.returncode,
        "clients_exit": client_proc.returncode,
        "round_s": round(sum(durations) / len(durations), 3) if durations else None,
        "round_s_each": [round(d, 3) for d in durations],
        "server_threads_max": threads_max,
        "server_rss_mb_max": round(rss_max / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,16,32,64", help="client counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per client count")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--clients-of", type=Path, default=None, help=argparse.SUPPRESS)  # internal: client process
    parser.add_argument("tomls", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients_of is not None:
        _clients(args.tomls, args.clients_of)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        rows = []
        for n in (int(x) for x in args.clients.split(",")):
            row = run(n, args.rounds, root / f"clients-{n}", args.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"bench": "many_clients", "rows": rows,
              "all_rounds_completed": all(r["rounds_completed"] == r["rounds"] for r in rows)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
