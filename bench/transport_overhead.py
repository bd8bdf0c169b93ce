"""Transport overhead: a split step over loopback gRPC with TLS + AES-GCM vs the in-process channel.

SmolLM2-135M-Instruct, batch 4 x 128, LoRA r=8 on every part, same thread count. The gRPC server
runs in this process (its own threads), so both modes share the same cores; steps are interleaved.
Also counts the bytes on the wire per step (serialized gRPC messages: frames with their AES-GCM
tags, mask, positions and headers) against the raw tensor bytes (hidden states and their gradients
at both cuts, plus per-sample lengths).
Prints one JSON line last with "ratio" and "wire_overhead_pct".
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedsplit.client import SplitClient
from fedsplit.models import load_model
from fedsplit.protocol import PROTOCOL_VERSION
from fedsplit.recipes.keygen import run_keygen
from fedsplit.recipes.local import local_split
from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
from fedsplit.security.identity import load_private_key, load_public_key
from fedsplit.security.tls import load_channel_tls, load_server_tls
from fedsplit.server import TrunkServer
from fedsplit.train.config import TrainConfig
from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

from benchlib import random_batch, step_parser


def _grpc_channel(server: TrunkServer, keys: Path, config_hash: bytes):
    run_keygen(keys, "server", with_ca=True)
    run_keygen(keys, "client-0")
    verifier = HandshakeVerifier(load_private_key(keys / "server.key"),
                                 {"client-0": load_public_key(keys / "client-0.pub")},
                                 set(), int(PROTOCOL_VERSION), config_hash, run_id="bench")
    factory = SessionFactory(verifier, lambda cid: functools.partial(server.handle, cid), "bench")
    tls = load_server_tls(keys / "server-tls.key", keys / "server-tls.crt")
    grpc_server = GrpcServer("127.0.0.1:0", factory, tls=tls).start()
    credentials = ClientCredentials(identity=load_private_key(keys / "client-0.key"),
                                    server_key=load_public_key(keys / "server.pub"),
                                    client_id="client-0", run_id="bench", config_hash=config_hash)
    channel = connect_grpc(f"127.0.0.1:{grpc_server.port}", credentials, tls=load_channel_tls(keys / "ca.crt"))
    return grpc_server, channel


def main() -> None:
    args = step_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)

    base, _ = load_model(args.model)
    cfg = TrainConfig(lr=1e-4, schedule="constant")
    total = args.steps + args.warmup
    local = local_split(copy.deepcopy(base), cfg, total, client_id="c").client
    remote_pair = local_split(copy.deepcopy(base), cfg, total, client_id="client-0")
    with tempfile.TemporaryDirectory() as keys:
        grpc_server, net_channel = _grpc_channel(remote_pair.server, Path(keys), hash_run_config({"bench": args.model}))
    # The same parts, but the client now reaches its trunk over gRPC + TLS + AES-GCM.
    remote = SplitClient(remote_pair.parts.head, remote_pair.parts.tail, net_channel, cfg, total)

    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"in_process": [], "grpc_tls": []}
    wire_before = 0
    for step in range(total):
        batch = random_batch(g, base.config.vocab_size, args.batch, args.seq)
        if step == args.warmup:
            stats = net_channel.transport.stats
            wire_before = stats.bytes_sent + stats.bytes_received
        for name, client in (("in_process", local), ("grpc_tls", remote)):
            start = time.perf_counter()
            client.train_step([batch])
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    stats = net_channel.transport.stats
    wire_per_step = (stats.bytes_sent + stats.bytes_received - wire_before) / args.steps
    net_channel.close()
    grpc_server.stop(grace=1.0)

    hidden = base.config.hidden_size
    raw = 4 * args.batch * args.seq * hidden * 4 + args.batch * 8  # 4 hidden tensors (fp32) + lengths
    local_s, grpc_s = statistics.median(times["in_process"]), statistics.median(times["grpc_tls"])
    print(f"in-process {[f'{t:.3f}' for t in times['in_process']]}")
    print(f"grpc+tls   {[f'{t:.3f}' for t in times['grpc_tls']]}")
    print(json.dumps({
        "bench": "transport_overhead", "ratio": round(grpc_s / local_s, 4), "grpc_tls_s": round(grpc_s, 4),
        "in_process_s": round(local_s, 4), "wire_bytes_per_step": int(wire_per_step), "raw_tensor_bytes_per_step": raw,
        "wire_overhead_pct": round(100 * (wire_per_step / raw - 1), 3), "model": args.model, "batch": args.batch,
        "seq": args.seq, "threads": args.threads, "steps": args.steps,
    }))


if __name__ == "__main__":
    main()
