"""Peak memory of a client that holds only its parts, against whole-model LoRA training.

FL-GLM (arXiv 2406.14898) puts the head and the tail on the client so that it need not hold the
model; ``fedsplit.models.partial`` makes that true in memory: a client process reads only the
embeddings, its head and tail blocks, the final norm and the LM head from the safetensors cache,
and the server only the trunk. Each mode runs in a fresh process; its peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read at its end:

* ``client``:  a real ``fedsplit client`` (head + tail, partial load) training ``--steps`` split steps
  against a real ``fedsplit server`` process (trunk, partial load) over gRPC with TLS and AES-GCM;
  the server's peak is reported too.
* ``client-whole-load``: the same client and server, but building their parts the old way (whole
  model loaded, then cut): what partial loading saves.
* ``client-loss-unchunked``: the client with ``train.loss_chunk_tokens = 0`` (the LM head and the loss over
  the whole batch at once): what the chunked loss saves.
* ``whole``: one process doing ``--steps`` whole-model LoRA steps (LoRA on every block, as the split
  run) on the same micro-batches, with the model's own logits and loss: what a FedAvg client must do.
* ``whole-chunked``: the same whole-model steps with the client's chunked LM head + loss: the ratio
  when both sides use the same loss (``client_rss_ratio_same_loss``).
* ``floor``: a process that only imports what a client imports (torch, transformers, peft, gRPC,
  fedsplit) and the model's class: the runtime every mode pays, reported to read the ratios.

Prints one JSON line last: {"bench": "client_memory", "client_rss_ratio": client / whole, ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedsplit.config import RunConfig


def _config(model: str, steps: int, threads: int) -> RunConfig:
    from fedsplit.recipes.network import free_port

    cfg = RunConfig()
    return replace(
        cfg, model=replace(cfg.model, name=model), data=replace(cfg.data, num_clients=1),
        federation=replace(cfg.federation, rounds=1, local_steps=steps),
        server=replace(cfg.server, address=f"127.0.0.1:{free_port()}", threads=threads),
        client=replace(cfg.client, threads=threads),
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _spawn(mode: str, out: Path, *rest: str) -> subprocess.Popen:
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([sys.executable, __file__, "--worker", mode, "--rss-out", str(out), *rest],
                            stdout=log, stderr=subprocess.STDOUT, env={**_env()})


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _read(path: Path) -> dict:
    if not path.exists():
        raise RuntimeError(f"{path.with_suffix('.log')}: the worker wrote no result")
    return json.loads(path.read_text())


# -- workers (one fresh process each) ---------------------------------------------------------------
def worker_cli(mode: str, argv: list[str]) -> int:
    """``fedsplit server`` / ``client`` in this process; ``*-whole-load`` builds its parts from the whole model."""
    from fedsplit import cli
    from fedsplit.recipes import network

    if mode.endswith("whole-load"):
        build = network.build_parts
        network.build_parts = lambda cfg, role=None: build(cfg)  # type: ignore[assignment]
    return cli.main(argv)


def worker_whole(config: Path, steps: int, chunked: bool) -> int:
    """Whole-model LoRA training steps on this client's micro-batches (what a FedAvg client runs):
    the model's own logits and loss (``train.loss_chunk_tokens = 0``), or, ``chunked``, the LM head + loss
    in chunks as the split client computes them (``CentralizedTrainer`` honours the setting)."""
    from dataclasses import replace

    import torch

    from fedsplit.adapters import add_part_adapters, trainable_parameters
    from fedsplit.configio import load_config
    from fedsplit.models import load_model
    from fedsplit.recipes.network import client_batches
    from fedsplit.split import split_model
    from fedsplit.train.centralized import CentralizedTrainer

    cfg = load_config(RunConfig, config)
    torch.set_num_threads(cfg.client.threads or 1)
    model, tokenizer = load_model(cfg.model.name)
    parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
    add_part_adapters(parts, cfg.lora, seed=cfg.train.seed)  # LoRA on every block, as the split run
    params = [p for part in parts for p in trainable_parameters(part)]
    train = cfg.train if chunked else replace(cfg.train, loss_chunk_tokens=0)
    trainer = CentralizedTrainer(model, params, train, steps)
    batches = client_batches(cfg, tokenizer)
    for step in range(steps):
        trainer.train_step([batches[step % len(batches)]])
    return 0


def worker_floor() -> int:
    """Import what a client imports, build nothing."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from fedsplit.client.runner import ClientRunner  # noqa: F401
    from fedsplit.models.partial import load_parts  # noqa: F401
    from fedsplit.recipes import network  # noqa: F401
    from fedsplit.transport import grpc_client  # noqa: F401

    return 0


def run_worker(argv: list[str]) -> int:
    """``--worker MODE --rss-out FILE ARGS...``: ARGS go to the worker untouched (``fedsplit`` flags)."""
    mode, rss_out, rest = argv[1], Path(argv[3]), argv[4:]
    start = time.perf_counter()
    if mode == "floor":
        code = worker_floor()
    else:
        whole = mode.startswith("whole")
        code = worker_whole(Path(rest[0]), int(rest[1]), mode == "whole-chunked") if whole else worker_cli(mode, rest)
    rss_out.write_text(json.dumps({"mode": mode, "peak_rss_mib": round(_peak_mib(), 1),
                                   "seconds": round(time.perf_counter() - start, 1), "exit": code}))
    return code


# -- the benchmark ---------------------------------------------------------------------------------------
def federation(cfg: RunConfig, out: Path, client_mode: str) -> tuple[dict, dict]:
    """One server and one client process; returns (client, server) results."""
    from fedsplit.recipes.network import write_federation

    server_toml, (client_toml,) = write_federation(cfg, out)
    server_mode = "server-whole-load" if client_mode.endswith("whole-load") else "server"
    server = _spawn(server_mode, out / "server.json", "server", "--config", str(server_toml), "--out", str(out / "srv"))
    client = _spawn(client_mode, out / "client.json", "client", "--config", str(client_toml),
                    "--out", str(out / "cli"))
    for proc in (client, server):
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"a worker failed (exit {proc.returncode}); logs in {out}")
    return _read(out / "client.json"), _read(out / "server.json")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(run_worker(sys.argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-client-memory"))
    args = parser.parse_args()

    results: dict[str, dict] = {}
    # label -> (worker mode, train.loss_chunk_tokens or None for the default)
    clients = {"client": ("client", None), "client-whole-load": ("client-whole-load", None),
               "client-loss-unchunked": ("client", 0)}
    for label, (mode, chunk) in clients.items():
        cfg = _config(args.model, args.steps, args.threads)
        if chunk is not None:
            cfg = replace(cfg, train=replace(cfg.train, loss_chunk_tokens=chunk))
        results[label], results[f"server ({label})"] = federation(cfg, args.out / label, mode)
        print(label, json.dumps(results[label]), "server", json.dumps(results[f"server ({label})"]), flush=True)
    whole_dir = args.out / "whole"
    whole_dir.mkdir(parents=True, exist_ok=True)
    config = whole_dir / "run.toml"
    from fedsplit.configio import dump_config

    config.write_text(dump_config(_config(args.model, args.steps, args.threads)))
    for mode in ("whole", "whole-chunked"):
        proc = _spawn(mode, whole_dir / f"{mode}.json", str(config), str(args.steps))
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"the {mode} worker failed; log in {whole_dir}")
        results[mode] = _read(whole_dir / f"{mode}.json")
        print(mode, json.dumps(results[mode]), flush=True)
    if _spawn("floor", whole_dir / "floor.json").wait(timeout=300) != 0:
        raise RuntimeError(f"the floor worker failed; log in {whole_dir}")
    floor = _read(whole_dir / "floor.json")["peak_rss_mib"]
    whole, whole_chunked = results["whole"]["peak_rss_mib"], results["whole-chunked"]["peak_rss_mib"]
    print(json.dumps({
        "bench": "client_memory", "model": args.model, "steps": args.steps, "threads": args.threads,
        "client_rss_ratio": round(results["client"]["peak_rss_mib"] / whole, 4),
        "client_whole_load_rss_ratio": round(results["client-whole-load"]["peak_rss_mib"] / whole, 4),
        "client_rss_ratio_above_floor": round((results["client"]["peak_rss_mib"] - floor) / (whole - floor), 4),
        "client_rss_ratio_same_loss": round(results["client"]["peak_rss_mib"] / whole_chunked, 4),
        "client_loss_unchunked_peak_rss_mib": results["client-loss-unchunked"]["peak_rss_mib"],
        "whole_model_chunked_loss_peak_rss_mib": whole_chunked,
        "runtime_floor_rss_mib": floor,
        "client_peak_rss_mib": results["client"]["peak_rss_mib"],
        "client_whole_load_peak_rss_mib": results["client-whole-load"]["peak_rss_mib"],
        "whole_model_peak_rss_mib": whole,
        "server_peak_rss_mib": results["server (client)"]["peak_rss_mib"],
        "server_whole_load_peak_rss_mib": results["server (client-whole-load)"]["peak_rss_mib"],
    }))


if __name__ == "__main__":
    main()
