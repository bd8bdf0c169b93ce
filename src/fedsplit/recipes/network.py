"""``fedsplit server`` / ``client`` / ``simulate``: the federation as separate processes over gRPC.

Each reads top to bottom: configuration -> model parts -> keys -> transport -> rounds -> outputs.
The server keeps the trunk and the global client-part adapters; each client keeps its head,
tail and data. Every activation, gradient and adapter crosses TLS and per-client AES-256-GCM.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedsplit.adapters import add_part_adapters, merge_adapters, save_adapter
from fedsplit.config import RunConfig, run_config_hash, run_config_sections
from fedsplit.configio import dump_config
from fedsplit.metrics import MetricsWriter
from fedsplit.models import load_model
from fedsplit.recipes.common import encode, load_federated_data
from fedsplit.recipes.own_data import own_client_batches, report_message
from fedsplit.recipes.round_mode import check_async, make_coordinator, round_timing
from fedsplit.recipes.run_report import (
    client_audit,
    client_evaluator,
    federated_eval_config,
    log_client_reports,
    report_run,
)
from fedsplit.split import SplitParts, split_model
from fedsplit.train.optim import schedule_horizon
from fedsplit.transport.shaping import shaped_address

log = logging.getLogger(__name__)

CLIENT_PREFIX = "client-prefix"  # <client out>/adapters/client-prefix: a prefix run's final head/tail prefixes


# -- shared --------------------------------------------------------------------------------------
def build_parts(cfg: RunConfig, role: str | None = None) -> tuple[object, SplitParts]:
    """The model cut as configured, with LoRA on every part initialized from the run seed.

    ``role`` ``"client"`` / ``"server"``: read only the weights that party holds (head + tail / trunk;
    see :mod:`fedsplit.models.partial`); the parts it does not hold cannot run."""
    if cfg.method.name == "prefix":  # P-tuning v2 (docs/ptuning.md); role None: split generation
        from fedsplit.recipes.prefix_network import build_full_prefix_parts, build_prefix_parts

        return build_prefix_parts(cfg, role) if role is not None else build_full_prefix_parts(cfg)
    if role is not None:
        from fedsplit.models.partial import load_role_parts

        return load_role_parts(cfg.model.name, cfg.model.head_layers, cfg.model.tail_layers, role, cfg.lora,
                               seed=cfg.train.seed)
    model, tokenizer = load_model(cfg.model.name)
    parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
    add_part_adapters(parts, cfg.lora, seed=cfg.train.seed)
    return tokenizer, parts


def keys_dir(cfg: RunConfig, config_dir: Path) -> Path:
    path = Path(cfg.security.keys_dir)
    return path if path.is_absolute() else (config_dir / path).resolve()


def _threads(count: int) -> None:
    if count:
        torch.set_num_threads(count)


def trunk_total_steps(cfg: RunConfig) -> int:
    """Optimizer steps the trunk takes in the whole run (the LR schedule's horizon)."""
    steppers = 1 if cfg.server.mode == "client-batch" else max(1, len(cfg.security.clients))
    return schedule_horizon(cfg.federation.rounds, cfg.federation.local_steps, steppers)


def frame_bound(cfg: RunConfig, parts: SplitParts) -> int:
    """The largest request frame this run can produce, in bytes: a FORWARD of ``max_tokens`` fp32
    hidden states (with its mask and positions) or a CLIENT_UPDATE of the head/tail adapters, plus
    headers. The server refuses anything larger at its first chunk."""
    from fedsplit.client.runner import client_adapters

    hidden = int(parts.trunk.config.hidden_size)
    activation = cfg.max_tokens * (hidden * 4 + 1 + 8)  # fp32 hidden, bool mask, int64 positions
    tensors = client_adapters(parts.head, parts.tail)
    adapters = sum(t.numel() * t.element_size() + len(k) + 64 for k, t in tensors.items())
    return max(activation, adapters) + (64 << 10)


def make_trunk_server(cfg: RunConfig, parts: SplitParts):
    from fedsplit.server import TrunkServer

    if cfg.server.mode == "client-batch":
        from fedsplit.server.batching import BatchingTrunkServer

        return BatchingTrunkServer(parts.trunk, cfg.train, trunk_total_steps(cfg), max_tokens=cfg.max_tokens,
                                   max_abs=cfg.server.max_abs_value, max_clients=max(1, len(cfg.security.clients)),
                                   wire_dtype=cfg.wire.torch_dtype())
    return TrunkServer(parts.trunk, cfg.train, trunk_total_steps(cfg), max_tokens=cfg.max_tokens,
                       max_abs=cfg.server.max_abs_value, lease_timeout_s=cfg.server.step_timeout_s,
                       wire_dtype=cfg.wire.torch_dtype(), lease=cfg.server.trunk_lease)


# -- server --------------------------------------------------------------------------------------
def run_server(cfg: RunConfig, config_dir: Path, out: Path, *, resume: bool = False) -> int:
    from fedsplit.client.runner import client_adapters, load_client_adapters
    from fedsplit.data.contract import contract_hash
    from fedsplit.protocol import PROTOCOL_VERSION
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.security.tls import load_server_tls
    from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint
    from fedsplit.server.coordinator import CoordinatorConfig
    from fedsplit.server.generation import attach_generation
    from fedsplit.server.private_resume import resume_private
    from fedsplit.server.private_round import build_private_strategy, private_frame_bound
    from fedsplit.strategy.build import build_strategy
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import SessionFactory

    _threads(cfg.server.threads)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.security.clients:
        raise ValueError("security.clients: the server admits no client; list their ids")
    check_async(cfg, len(cfg.security.clients))  # round_mode = "async": refuse what it cannot run, first
    tokenizer, parts = build_parts(cfg, role="server")
    config_hash = run_config_hash(cfg, tokenizer)
    keys = keys_dir(cfg, config_dir)

    strategy = build_strategy(cfg.strategy, local_steps=cfg.federation.local_steps, lr=cfg.train.lr,
                              min_clients=cfg.federation.min_clients, fraction=cfg.federation.fraction,
                              seed=cfg.train.seed)
    strategy = build_private_strategy(cfg, strategy, keys)  # [aggregation]: DP-FedAvg, secagg / ckks / hybrid
    coordinator_cfg = CoordinatorConfig(
        num_rounds=cfg.federation.rounds,
        round_timeout_s=round_timing(cfg).round_timeout_s, step_timeout_s=cfg.server.step_timeout_s,
        join_timeout_s=cfg.server.join_timeout_s, join_grace_s=cfg.server.join_grace_s,
        ordered_steps=round_timing(cfg).ordered_steps,  # [federation] round_mode
        max_examples_per_round=cfg.federation.local_steps * cfg.train.batch_size * cfg.train.grad_accum,
        max_examples_per_client=cfg.federation.max_examples_per_client,
        update_bound_factor=cfg.federation.update_bound_factor, max_update_norm=cfg.federation.max_update_norm,
        keep_checkpoints=cfg.server.keep_checkpoints,
        contract_hash=contract_hash(cfg.contract) if cfg.contract.declared else "",  # the reports must name it
    )
    metrics = MetricsWriter(out / "metrics.jsonl", fresh=not resume)  # a rerun keeps the last one as metrics.1
    hierarchy = start_hierarchy(cfg, parts, keys, config_hash, out) if cfg.server.mode == "hierarchical" else None
    coordinator = make_coordinator(  # [federation] round_mode = "async": an AsyncCoordinator
        cfg, hierarchy.router if hierarchy else make_trunk_server(cfg, parts), strategy,
        client_adapters(parts.head, parts.tail), cfg.security.clients,
        coordinator_cfg, metrics=metrics, checkpoint_dir=out / "checkpoints",
        run_id=cfg.security.run_id, config_hash=config_hash.hex(), evaluation=federated_eval_config(cfg),
    )
    attach_generation(coordinator)  # split generation between rounds (fedsplit generate --server)
    if resume:
        found = latest_checkpoint(out / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        restored = load_checkpoint(found)
        coordinator.restore(restored)
        resume_private(strategy, found.parent, restored.round, client_adapters(parts.head, parts.tail),
                       restored.global_adapters)  # hybrid_top_fraction: the last global update ranks tensors
        log.info("resumed from %s", found)

    admitted = {cid: load_public_key(keys / f"{cid}.pub") for cid in cfg.security.clients}
    verifier = HandshakeVerifier(load_private_key(keys / f"{cfg.security.server_name}.key"), admitted,
                                 set(cfg.security.revoked), int(PROTOCOL_VERSION), config_hash,
                                 run_id=cfg.security.run_id, config_sections=run_config_sections(cfg, tokenizer))
    tls = None if cfg.security.insecure else load_server_tls(
        keys / "server-tls.key", keys / "server-tls.crt", keys / "ca.crt" if cfg.security.mutual_tls else None)
    numel = sum(t.numel() for t in client_adapters(parts.head, parts.tail).values())
    agg_frame = private_frame_bound(cfg.aggregation, numel, len(cfg.security.clients))  # ckks uploads: ~8x adapters
    server = GrpcServer(cfg.server.address, SessionFactory(verifier, coordinator.handler_for, cfg.security.run_id),
                        tls=tls, insecure=cfg.security.insecure, max_message_bytes=cfg.server.max_message_bytes,
                        max_frame_bytes=max(frame_bound(cfg, parts), cfg.server.max_message_bytes, agg_frame),
                        max_streams=2 * len(cfg.security.clients) + 4, on_disconnect=coordinator.on_disconnect)
    server.start()
    log.info("serving %s on %s (%s, %s)", cfg.security.run_id, cfg.server.address, cfg.server.mode,
             "INSECURE" if cfg.security.insecure else "TLS")
    stop = _install_stop_handlers(coordinator)
    try:
        result = coordinator.start().wait()
    except BaseException:
        if stop.is_set():
            log.info("stopped by signal after round %d; last checkpoint kept", coordinator.completed_round)
            return 0
        raise
    finally:
        server.stop(grace=2.0)
        if hierarchy is not None:
            hierarchy.close()
        metrics.close()
    load_client_adapters(parts.head, parts.tail, result.global_adapters)
    if cfg.method.name == "prefix":  # one PEFT prefix-tuning adapter of the three parts
        from fedsplit.recipes.prefix_network import save_final_prefix

        save_final_prefix(parts, out / "adapters", cfg.model.name)
    else:
        _save_final_adapters(parts, out / "adapters", cfg.model.name)
    log.info("run complete: %d rounds; adapters in %s", result.rounds_completed, out / "adapters")
    report_run(out, f"federated split fine-tuning of {cfg.model.name}")  # table, summary event, loss.png
    return 0


def start_hierarchy(cfg: RunConfig, parts: SplitParts, keys: Path, config_hash: bytes, out: Path):
    """Server-hierarchical mode: K sub-server processes, each a trunk replica, behind a relaying router."""
    from fedsplit.recipes import hierarchy
    from fedsplit.recipes.hierarchy import RunIdentity, SecurityFiles, SubServerSpec
    from fedsplit.security.identity import load_private_key

    tls = {} if cfg.security.insecure else dict(
        tls_key=keys / "server-tls.key", tls_cert=keys / "server-tls.crt", ca_cert=keys / "ca.crt")
    spec = SubServerSpec(
        run=RunIdentity(cfg.security.run_id, config_hash.hex(), list(cfg.security.clients), trunk_total_steps(cfg)),
        security=SecurityFiles(keys / f"{cfg.security.server_name}.key", keys / "root.pub",
                               insecure=cfg.security.insecure, **tls),
        model=cfg.model, train=cfg.train, lora_trunk=cfg.lora_trunk, hierarchy=cfg.hierarchy, wire=cfg.wire,
        method=cfg.method,  # prefix: the replicas build prefixed trunks (docs/ptuning.md)
    )
    return hierarchy.start_hierarchy(spec, parts.trunk, load_private_key(keys / "root.key"), out)


def _install_stop_handlers(coordinator) -> threading.Event:
    """SIGINT/SIGTERM: stop after making sure the last completed round is checkpointed."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()
        log.warning("signal %d: shutting down (checkpoint of round %d kept)", signum, coordinator.completed_round)
        coordinator.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def _save_final_adapters(parts: SplitParts, out: Path, base_model: str) -> None:
    for name in ("head", "trunk", "tail"):
        save_adapter(getattr(parts, name), out / name, base_model=base_model)
    merge_adapters(list(parts), out / "merged", base_model=base_model)


# -- client --------------------------------------------------------------------------------------
def client_batches(cfg: RunConfig, tokenizer) -> list[dict]:
    """This client's own silo, tokenized and cut into fixed micro-batches (the runner orders them)."""
    import random

    from fedsplit.data import collate

    data = load_federated_data(cfg.data, cfg.train.seed)
    if cfg.client.silo >= len(data.silos):
        raise ValueError(f"client.silo: expected < {len(data.silos)} (data.num_clients), got {cfg.client.silo}")
    encoded = encode(data.silos[cfg.client.silo], tokenizer, cfg)
    random.Random(cfg.train.seed).shuffle(encoded)
    size = cfg.train.batch_size
    return [collate(encoded[i : i + size], tokenizer.pad_token_id, cfg.train.padding_side)
            for i in range(0, len(encoded) - size + 1, size)]


def run_client(cfg: RunConfig, config_dir: Path, out: Path) -> int:
    from fedsplit.client.private_update import private_update_for
    from fedsplit.client.runner import ClientRunner
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.security.tls import load_channel_tls
    from fedsplit.transport.handshake import ClientCredentials

    _threads(cfg.client.threads)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, parts = build_parts(cfg, role="client")
    keys = keys_dir(cfg, config_dir)
    cid = cfg.client.id
    credentials = ClientCredentials(
        identity=load_private_key(keys / f"{cid}.key"),
        server_key=load_public_key(keys / f"{cfg.security.server_name}.pub"),
        client_id=cid, run_id=cfg.security.run_id, config_hash=run_config_hash(cfg, tokenizer),
        config_sections=run_config_sections(cfg, tokenizer),
    )
    tls = None
    if not cfg.security.insecure:
        mtls = (keys / f"{cid}-tls.key", keys / f"{cid}-tls.crt") if cfg.security.mutual_tls else (None, None)
        tls = load_channel_tls(keys / "ca.crt", *mtls)

    # [[client.sources]]: its own files, validated against [contract] before dialling; else a silo of data.*
    batches, data_report = (own_client_batches(cfg, config_dir, tokenizer) if cfg.client.sources
                            else (client_batches(cfg, tokenizer), None))
    address, server_name, proxy = shaped_address(cfg.server.address, cfg.link)  # [link]: a shaping proxy

    def connect():
        return dial(address, credentials, tls=tls, max_message_bytes=cfg.server.max_message_bytes,
                    deadline_s=cfg.server.deadline_s, server_name=server_name)

    private = private_update_for(cfg, keys, credentials.identity)  # [aggregation] secagg / ckks / hybrid; None: plain
    with MetricsWriter(out / "metrics.jsonl") as metrics:
        if data_report is not None:
            metrics.write("data_report", client=cid, **data_report.to_dict())
        runner = ClientRunner(cid, parts.head, parts.tail, batches, cfg.train, connect,
                              hidden_noise_std=cfg.privacy.hidden_noise_std, data_report=report_message(data_report),
                              evaluator=client_evaluator(cfg, tokenizer), audit=client_audit(cfg), private=private,
                              wire_dtype=cfg.wire.torch_dtype(),
                              on_step=lambda rnd, step, result: metrics.write(
                                  "train_step", client=cid, round=rnd, step=step, loss=result.loss,
                                  lr=result.lr, grad_norm=result.grad_norm))
        result = runner.run()
        log_client_reports(metrics, cid, runner.evaluator, runner.audit)
        for report in result.rounds:
            metrics.write("round", client=cid, round=report.round, loss=report.loss, examples=report.num_examples)
        metrics.write("done", client=cid, final_round=result.final_round, lost_rounds=result.lost_rounds,
                      reconnects=result.reconnects)
    runner.close()
    if proxy is not None:
        proxy.close()
    if result.finished:  # this organisation's copy of the final global head/tail
        if cfg.method.name == "prefix":  # (the server's adapters/prefix holds them with the trunk's)
            from fedsplit.split.prefix import save_part_prefixes

            save_part_prefixes([parts.head, parts.tail], out / "adapters" / CLIENT_PREFIX, base_model=cfg.model.name)
        else:
            for name in ("head", "tail"):
                save_adapter(getattr(parts, name), out / "adapters" / name, base_model=cfg.model.name)
        log.info("client %s: final head/tail %s in %s", cid,
                 "prefixes" if cfg.method.name == "prefix" else "adapters", out / "adapters")
    log.info("client %s done after round %d", cid, result.final_round)
    return 0


def dial(address: str, credentials, *, tls=None, max_message_bytes: int = 4 << 20, deadline_s: float = 300.0,
         connect_timeout_s: float = 10.0, server_name: str | None = None):
    """One session with the server: gRPC stream + handshake. ``tls=None`` is the insecure transport.

    gRPC reports any TLS failure as "could not connect"; when the server's certificate is the
    cause (it does not name the host dialled, or the pinned CA did not issue it) this raises
    `ServerCertificateError` saying so, which the client runner does not retry.
    """
    from fedsplit.security.tls import check_server_certificate
    from fedsplit.transport.errors import TransportError
    from fedsplit.transport.grpc_client import connect_grpc

    try:
        return connect_grpc(address, credentials, tls=tls, insecure=tls is None, max_message_bytes=max_message_bytes,
                            deadline_s=deadline_s, connect_timeout_s=connect_timeout_s, server_name=server_name)
    except TransportError:
        if tls is not None:
            check_server_certificate(address, tls)
        raise


# -- simulate ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_federation(cfg: RunConfig, out: Path) -> tuple[Path, list[Path]]:
    """Keys (CA, server, one identity per client) and one TOML per process, under ``out``."""
    from fedsplit.recipes.keygen import run_keygen
    from fedsplit.recipes.links import client_config, client_links
    from fedsplit.security.pki import run_issue_client_cert

    clients = [f"client-{k}" for k in range(cfg.data.num_clients)]
    links = client_links(cfg, clients)  # [simulate.links.<id>], else [link]
    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    if not (keys / "ca.crt").exists():
        run_keygen(keys, cfg.security.server_name, with_ca=True)
        run_keygen(keys, "root")  # the root server's identity towards its sub-servers (hierarchical mode)
        for cid in clients:
            run_keygen(keys, cid)
            if cfg.security.mutual_tls:
                run_issue_client_cert(keys, cid)
    security = replace(cfg.security, keys_dir=str(keys.resolve()), clients=clients)
    # One machine: the trunk (most of the blocks) gets the cores, each client one thread.
    server_cfg = replace(cfg, security=security,
                         server=replace(cfg.server, threads=cfg.server.threads or (os.cpu_count() or 1)),
                         client=replace(cfg.client, threads=cfg.client.threads or 1))
    (out / "server.toml").write_text(dump_config(server_cfg))
    client_files = []
    for silo, cid in enumerate(clients):
        path = out / f"{cid}.toml"
        own = replace(server_cfg, client=replace(cfg.client, id=cid, silo=silo))
        path.write_text(dump_config(client_config(own, links[cid])))
        client_files.append(path)
    return out / "server.toml", client_files


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "w")  # noqa: SIM115 - closed by the process's end
    # Several processes share the cores: idle OpenMP workers must sleep, not spin.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return subprocess.Popen([sys.executable, "-m", "fedsplit.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=env)


def simulate(cfg: RunConfig, out: Path, *, timeout_s: float = 3600.0) -> Path:
    """One server and N client processes on 127.0.0.1; returns the server's run directory."""
    from tqdm.auto import tqdm

    from fedsplit.metrics import read_metrics

    if cfg.server.address.endswith(":0") or cfg.server.address == RunConfig().server.address:
        cfg = replace(cfg, server=replace(cfg.server, address=f"127.0.0.1:{free_port()}"))
    server_toml, client_tomls = write_federation(cfg, out)
    server_out = out / "server"
    flags = ["--insecure"] if cfg.security.insecure else []
    procs = {"server": _spawn(["server", "--config", str(server_toml), "--out", str(server_out), *flags],
                              out / "logs" / "server.log")}
    for path in client_tomls:
        procs[path.stem] = _spawn(["client", "--config", str(path), "--out", str(out / path.stem), *flags],
                                  out / "logs" / f"{path.stem}.log")
    deadline, started = time.monotonic() + timeout_s, time.time()
    # smoothing=0: the rate is the mean over the run (rounds are minutes apart; a moving average of the
    # one-second polls gave estimates like "1/3 [05:08<00:02, 1.01s/round]")
    with tqdm(total=cfg.federation.rounds, desc="federated rounds", unit="round", smoothing=0) as bar:
        while procs["server"].poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
            metrics = server_out / "metrics.jsonl"
            # this run's rounds only: an earlier run's file is still there until the server moves it aside
            done = sum(r["time"] >= started for r in read_metrics(metrics, "round_end")) if metrics.exists() else 0
            bar.update(done - bar.n)
            crashed = [name for name, p in procs.items() if p.poll() not in (None, 0)]
            if crashed:
                break
    failed = _finish(procs, deadline)
    if failed:
        lines = [f"{name} exited with {code}: {last_error_line(out / 'logs' / f'{name}.log')}" for name, code in failed]
        raise RuntimeError(f"federation failed: {'; '.join(lines)} (logs in {out / 'logs'})")
    return server_out


def last_error_line(log_path: Path) -> str:
    """The process's own last error line: its one-line CLI error, an ERROR log line or a traceback's end."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {log_path}"
    errors = [line for line in lines if ": error: " in line or " ERROR " in line or _EXCEPTION_LINE.match(line)]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "its log is empty"


_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")  # a traceback's last line


def _finish(procs: dict[str, subprocess.Popen], deadline: float) -> list[tuple[str, int | str]]:
    failed: list[tuple[str, int | str]] = []
    for name, proc in procs.items():
        try:
            code: int | str = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        if code != 0:
            failed.append((name, code))
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    return failed
