"""Server throughput: the trunk server alone, fed by load generators that replay real client traffic.

``bench/parallel_training.py`` runs real clients (head, tail and a 49k x 576 LM head each) beside
the server on two cores, so its ratios measure the CPU scheduler as much as the server. Here the
clients do no model compute at all:

1. Record. One process runs SmolLM2's head, trunk and tail on real stdlib-docs examples (batch 1,
   128 tokens) and keeps, per sample, what a client sends: the head's hidden states, the mask,
   the position ids, and the gradient of the loss at the trunk output.
2. Replay. A real ``fedsplit server`` process (TLS + AES-GCM, the round coordinator, the trunk
   service of the mode under test) is fed by N load-generator processes that speak the real
   protocol (handshake, JOIN_ROUND, FORWARD / BACKWARD / OPTIMIZER_STEP per step, CLIENT_UPDATE)
   with the recorded tensors. A generator's only work is sealing and sending bytes.

Throughput = trunk steps served per second, from the first FORWARD to the last OPTIMIZER_STEP
seen by any generator. Modes are interleaved and repeated; medians and spread are reported:
  client-batch at 2 / 4 / 8 clients over sequential at the same count (server: 1 torch thread);
  hierarchical K = 2 over K = 1 (each sub-server 1 thread), 4 clients.
Prints one JSON line last: ``server_client_batch_speedup_{2,4,8}``, ``server_hierarchical_speedup_2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedsplit.config import RunConfig

from benchlib import summary


def _config(model: str, clients: int, steps: int, mode: str, subservers: int = 1, threads: int = 1) -> RunConfig:
    from fedsplit.recipes.network import free_port

    cfg = RunConfig()
    return replace(
        cfg,
        model=replace(cfg.model, name=model),
        train=replace(cfg.train, batch_size=1, max_length=128, lr=1e-4, schedule="constant"),
        data=replace(cfg.data, num_clients=clients),
        federation=replace(cfg.federation, rounds=1, local_steps=steps, min_clients=clients),
        server=replace(cfg.server, address=f"127.0.0.1:{free_port()}", mode=mode, threads=threads, join_grace_s=600.0,
                       join_timeout_s=900.0, step_timeout_s=600.0),
        client=replace(cfg.client, threads=1),
        hierarchy=replace(cfg.hierarchy, subservers=subservers, threads=1, sync_every=8),
    )


# -- record ---------------------------------------------------------------------------------------
def record(cfg: RunConfig, samples: int, path: Path) -> None:
    """What ``samples`` real client steps send: hidden (1, T, H), mask, positions, grad (1, T, H)."""
    import torch
    from safetensors.torch import save_file

    from fedsplit.recipes.network import build_parts, client_batches
    from fedsplit.split.parts import positions_from_mask
    from fedsplit.train.optim import causal_lm_loss

    tokenizer, parts = build_parts(cfg)
    batches = client_batches(cfg, tokenizer)[:samples]
    tensors = {}
    for i, batch in enumerate(batches):
        mask = batch["attention_mask"]
        positions = positions_from_mask(mask)
        with torch.no_grad():
            hidden = parts.head(batch["input_ids"], mask, positions)  # (1, T, H) -> cut 1
            trunk_out = parts.trunk(hidden, mask, positions)  # (1, T, H) -> cut 2
        out = trunk_out.requires_grad_()
        causal_lm_loss(parts.tail(out, mask, positions), batch["labels"]).backward()
        tensors.update({f"{i}/hidden": hidden, f"{i}/mask": mask.bool(), f"{i}/positions": positions,
                        f"{i}/grad": out.grad})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    tokenizer.save_pretrained(str(path.with_suffix(".tokenizer")))  # the generators hash their configs with it


# -- replay (one load-generator process) ----------------------------------------------------------
def replay(config: Path, tensors: Path, out: Path) -> None:
    """Take part in the run like a client, sending recorded tensors instead of computing them."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from fedsplit.config import run_config_hash, run_config_sections
    from fedsplit.configio import load_config
    from fedsplit.protocol import decode_tensor, encode_tensor, pb
    from fedsplit.recipes.network import keys_dir
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.security.tls import load_channel_tls
    from fedsplit.transport.grpc_client import connect_grpc
    from fedsplit.transport.handshake import ClientCredentials

    cfg = load_config(RunConfig, config, [])
    keys, cid = keys_dir(cfg, config.parent), cfg.client.id
    tokenizer = AutoTokenizer.from_pretrained(str(tensors.with_suffix(".tokenizer")))
    credentials = ClientCredentials(
        identity=load_private_key(keys / f"{cid}.key"), server_key=load_public_key(keys / "server.pub"),
        client_id=cid, run_id=cfg.security.run_id, config_hash=run_config_hash(cfg, tokenizer),
        config_sections=run_config_sections(cfg, tokenizer))
    deadline = time.monotonic() + 300  # the server may still be loading (hierarchical: its sub-servers too)
    while True:
        try:
            channel = connect_grpc(cfg.server.address, credentials, tls=load_channel_tls(keys / "ca.crt"),
                                   max_message_bytes=cfg.server.max_message_bytes, deadline_s=cfg.server.deadline_s)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    recorded = load_file(str(tensors))
    count = len({k.split("/")[0] for k in recorded})
    samples = [{name: recorded[f"{i}/{name}"] for name in ("hidden", "mask", "positions", "grad")}
               for i in range(count)]
    times: list[tuple[float, float]] = []
    while True:
        plan = channel.call(pb.JOIN_ROUND, pb.JoinRound(num_examples=count))
        if plan.finished:
            break
        if plan.wait_s > 0:
            time.sleep(plan.wait_s)
            continue
        for step in range(plan.local_steps):
            s = samples[(step + int(cid.split("-")[-1])) % count]
            started = time.monotonic()
            forward = pb.Forward(hidden=encode_tensor(s["hidden"]), attention_mask=encode_tensor(s["mask"]),
                                 position_ids=encode_tensor(s["positions"]), train=True)
            reply = channel.call(pb.FORWARD, forward, round=plan.round, step=step)
            assert decode_tensor(reply.hidden, "hidden").shape == s["hidden"].shape
            channel.call(pb.BACKWARD, pb.Backward(grad=encode_tensor(s["grad"])), round=plan.round, step=step)
            channel.call(pb.OPTIMIZER_STEP, pb.OptimizerStep(client_grad_sq_norm=0.5), round=plan.round, step=step)
            times.append((started, time.monotonic()))
        update = pb.ClientUpdate(round=plan.round, adapters=plan.adapters, num_examples=plan.local_steps,
                                 metrics={"loss": 0.0})
        channel.call(pb.CLIENT_UPDATE, update, round=plan.round)
    channel.close()
    out.write_text(json.dumps({"first": min(t[0] for t in times), "last": max(t[1] for t in times),
                               "steps": len(times)}))


# -- one run --------------------------------------------------------------------------------------
def run_once(cfg: RunConfig, tensors: Path, out: Path, timeout_s: float) -> float:
    """Trunk steps per second of one server run fed by N replaying load generators."""
    from fedsplit.recipes.network import _spawn, write_federation

    server_toml, client_tomls = write_federation(cfg, out)
    procs = [_spawn(["server", "--config", str(server_toml), "--out", str(out / "server")], out / "server.log")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for path in client_tomls:
        log = open(out / f"{path.stem}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, __file__, "--replay", str(path), "--tensors", str(tensors),
                                       "--result", str(out / f"{path.stem}.json")],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if code != 0:
            for p in procs:
                p.kill()
            raise RuntimeError(f"a process of the run in {out} exited with {code}; see its log there")
    results = [json.loads((out / f"{p.stem}.json").read_text()) for p in client_tomls]
    steps = sum(r["steps"] for r in results)
    return steps / (max(r["last"] for r in results) - min(r["first"] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8, help="trunk steps per client")
    parser.add_argument("--clients", default="2,4,8", help="client counts for client-batch vs sequential")
    parser.add_argument("--hier-clients", type=int, default=4, help="clients of the hierarchical runs (0: none)")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the sequential and "
                        "client-batch server (hierarchical: 1 per sub-server)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/server_throughput"))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--replay", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tensors", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay, args.tensors, args.result)

    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.clients.split(",")]
    tensors = args.out / "recorded.safetensors"
    record(_config(args.model, max(counts), args.steps, "sequential"), max(counts), tensors)
    plan = [(f"{mode}-{n}", (mode, n, 1)) for n in counts for mode in ("sequential", "client-batch")]
    if args.hier_clients:
        plan += [(f"hierarchical-K{k}", ("hierarchical", args.hier_clients, k)) for k in (1, 2)]
    rates: dict[str, list[float]] = {name: [] for name, _ in plan}
    for repeat in range(args.repeats):  # interleaved: every mode once per repeat
        for name, (mode, n, k) in plan:
            threads = 1 if mode == "hierarchical" else args.server_threads
            cfg = _config(args.model, n, args.steps, mode, subservers=k, threads=threads)
            rate = run_once(cfg, tensors, args.out / f"r{repeat}" / name, args.timeout)
            rates[name].append(rate)
            print(f"repeat {repeat}: {name:>18}  {rate:.3f} steps/s", flush=True)
    result: dict[str, object] = {"model": args.model, "steps_per_client": args.steps, "repeats": args.repeats,
                                 "server_threads": args.server_threads,
                                 "machine": f"{os.cpu_count()} cores",
                                 "steps_per_s": {k: summary(v) for k, v in rates.items()}}
    for n in counts:
        ratios = [b / s for b, s in zip(rates[f"client-batch-{n}"], rates[f"sequential-{n}"], strict=True)]
        result[f"server_client_batch_speedup_{n}"] = statistics.median(ratios)
        result[f"server_client_batch_speedup_{n}_spread"] = [min(ratios), max(ratios)]
    if args.hier_clients:
        ratios = [two / one for two, one in zip(rates["hierarchical-K2"], rates["hierarchical-K1"], strict=True)]
        result["server_hierarchical_speedup_2"] = statistics.median(ratios)
        result["server_hierarchical_speedup_2_spread"] = [min(ratios), max(ratios)]
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
