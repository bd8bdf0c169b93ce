"""Split generation with per-party KV caches vs re-running the whole prefix for every token (FL-GLM's code).

One process holds a loopback gRPC server (TLS + the signed handshake + AES-GCM frames, as in a
real run) serving the trunk: GENERATE_* from the trunk-side caches, and evaluation FORWARDs for
the baseline. The client's head and tail run in this process's main thread. Greedy decoding
of a chat prompt, EOS ignored so that every run generates exactly N tokens; both modes must give
the same tokens. Reported per N: tokens/s (the prefill included) and bytes on the wire per
generated token (serialized gRPC messages, both directions).
The two modes alternate token by token (after each cached token, the baseline's step for the
same prefix), so that a load change on the shared machine hits both. With --repeats K each length
runs K times; tokens/s are medians, ``speedup_N`` the median of the K ratios, ``speedup_N_range``
their min and max.
Prints one JSON line last with "speedup_128" and "bytes_per_token" (cached, at 128 tokens).

    OMP_NUM_THREADS=1 python bench/split_inference.py                # SmolLM2-135M, 32/128/512 tokens
    python bench/split_inference.py --quick                          # seconds, tiny-llama
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedsplit.inference import SamplingSettings, encode_prompt, iter_tokens
from fedsplit.inference.baseline import rerun_step
from fedsplit.inference.remote import RemoteTrunk, RerunTrunk
from fedsplit.models import load_model
from fedsplit.protocol import PROTOCOL_VERSION
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
from fedsplit.security.identity import load_private_key, load_public_key
from fedsplit.security.tls import load_channel_tls, load_server_tls
from fedsplit.server import TrunkServer
from fedsplit.server.generation import GenerationLimits, GenerationService, serving_handlers
from fedsplit.split import split_model
from fedsplit.train.config import TrainConfig
from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
          "and tell what happens over the following year.")


PASSAGE = (
    "Summarize the following report in a few sentences.\n\n"
    "The town council met on Tuesday evening to discuss the future of the old harbour. For more than a century "
    "the harbour had served the fishing fleet, but in the last twenty years the number of boats had fallen from "
    "over sixty to fewer than ten. Several proposals were presented. The first, from a group of local businesses, "
    "suggested turning the eastern quay into a marina for leisure boats, with a small hotel and restaurants along "
    "the waterfront. Supporters argued that this would bring visitors throughout the summer and create jobs for "
    "young people who currently leave the town to find work. The second proposal, from the fishermen's "
    "cooperative, asked the council to repair the breakwater and the ice plant so that the remaining boats could "
    "keep working, and to offer reduced mooring fees to attract new crews. The cooperative warned that a marina "
    "would push fishing out of the harbour for good. A third group, made up of residents and a local school, "
    "proposed a nature reserve on the salt marsh beside the harbour, pointing out that the marsh is a resting "
    "place for migrating birds every autumn. After three hours of discussion the council agreed to commission a "
    "study of all three options, to be presented in the spring, and to hold a public meeting before any decision."
)


def _serve(trunk, keys: Path, context: int):
    """A loopback gRPC server (TLS) for the trunk, and one client channel to it."""
    config_hash = hash_run_config({"bench": "split_inference"})
    run_keygen(keys, "server", with_ca=True)
    run_keygen(keys, "client-0")
    service = GenerationService(trunk, GenerationLimits(max_new_tokens=context, idle_s=3600.0))
    evaluate = TrunkServer(trunk, TrainConfig(max_length=context), total_steps=1)
    verifier = HandshakeVerifier(load_private_key(keys / "server.key"),
                                 {"client-0": load_public_key(keys / "client-0.pub")},
                                 set(), int(PROTOCOL_VERSION), config_hash, run_id="bench")
    factory = SessionFactory(verifier, serving_handlers(service, evaluate), "bench")
    server = GrpcServer("127.0.0.1:0", factory, tls=load_server_tls(keys / "server-tls.key", keys / "server-tls.crt"),
                        max_frame_bytes=64 << 20).start()
    credentials = ClientCredentials(identity=load_private_key(keys / "client-0.key"),
                                    server_key=load_public_key(keys / "server.pub"),
                                    client_id="client-0", run_id="bench", config_hash=config_hash)
    channel = connect_grpc(f"127.0.0.1:{server.port}", credentials, tls=load_channel_tls(keys / "ca.crt"))
    return server, channel


def _wire(channel) -> int:
    stats = channel.transport.stats
    return int(stats.bytes_sent + stats.bytes_received)


def _paired(parts, cached_link, rerun_link, prompt, n: int, channel, stride: int, all_logits: bool = True):
    """Cached generation of ``n`` tokens, with the baseline's step for the same prefix run between two tokens.

    Returns (cached seconds, cached wire bytes, re-run seconds, re-run wire bytes, tokens, same tokens).
    The two modes alternate token by token, so that a load change on the shared machine hits both.
    The cached time is the time spent inside the generator (prefill, steps, GENERATE_END). Re-run
    step ``i`` runs head, trunk (an evaluation FORWARD) and tail on prompt + tokens[:i] and must
    predict tokens[i]. With ``stride`` > 1 only every stride-th step (and the last) is run and
    timed; the others are interpolated linearly between their measured neighbours (a step's cost
    depends only on its prefix length).
    """
    sampled = set(range(0, n, stride)) | {n - 1}
    steps = iter_tokens(parts.head, parts.tail, cached_link, prompt, None, SamplingSettings(max_new_tokens=n))
    cached_s, cached_wire, tokens = 0.0, 0, []
    seconds, wire, match = {}, {}, True
    while True:
        before, start = _wire(channel), time.perf_counter()
        token = next(steps, None)  # after the last token: GENERATE_END, then None
        cached_s, cached_wire = cached_s + time.perf_counter() - start, cached_wire + _wire(channel) - before
        if token is None:
            break
        i = len(tokens)
        tokens.append(int(token[0]))
        if i in sampled:
            ids = torch.cat([prompt, torch.tensor(tokens[:i], dtype=torch.long).reshape(1, -1)], dim=1)  # (1, T + i)
            before, start = _wire(channel), time.perf_counter()
            logits = rerun_step(parts.head, parts.tail, rerun_link.forward, ids, all_logits=all_logits)  # (1, V)
            predicted = int(logits.argmax(-1)[0])
            seconds[i], wire[i] = time.perf_counter() - start, _wire(channel) - before
            match &= predicted == tokens[i]
    return (cached_s, cached_wire, _interpolated_sum(seconds, len(tokens)), _interpolated_sum(wire, len(tokens)),
            tokens, match)


def _interpolated_sum(samples: dict[int, float], n: int) -> float:
    points = sorted(samples)
    total = 0.0
    for i in range(n):
        right = next(p for p in points if p >= i)
        left = max((p for p in points if p <= i), default=right)
        weight = 0.0 if right == left else (i - left) / (right - left)
        total += (1 - weight) * samples[left] + weight * samples[right]
    return total


def client_batching(parts, prompt, n: int, clients: int) -> dict[str, float]:
    """Aggregate tokens/s of ``clients`` concurrent cached generations, steps batched or one at a time
    (in-process channels: this measures the trunk pass, not the network)."""
    import threading

    from fedsplit.channel import in_process_channel

    out = {}
    settings = SamplingSettings(max_new_tokens=n)
    for batched in (False, True):
        service = GenerationService(parts.trunk, GenerationLimits(idle_s=3600.0), batch_steps=batched)

        def one(index: int, service: GenerationService = service) -> None:
            cid = f"client-{index}"
            channel, _ = in_process_channel(cid, lambda kind, r, s, req: service.handle(cid, kind, r, s, req))
            list(iter_tokens(parts.head, parts.tail, RemoteTrunk(channel), prompt, None, settings))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out["batched" if batched else "one_at_a_time"] = round(clients * n / (time.perf_counter() - start), 3)
        print(f"{clients} clients, steps {'batched' if batched else 'one at a time'}: "
              f"{out['batched' if batched else 'one_at_a_time']:.2f} tokens/s in all", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--head-layers", type=int, default=2)
    parser.add_argument("--tail-layers", type=int, default=2)
    parser.add_argument("--new-tokens", default="32,128,512", help="comma-separated generation lengths")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per length (medians and the speedups' range kept)")
    parser.add_argument("--rerun-stride", type=int, default=16,
                        help="baseline above --full-rerun-max: time every k-th step and interpolate the others")
    parser.add_argument("--full-rerun-max", type=int, default=128, help="longest baseline run step by step in full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--long-prompt", action="store_true",
                        help="a report to summarize (~270 tokens on SmolLM2) instead of the short request")
    parser.add_argument("--rerun-last-logits", action="store_true",
                        help="a stronger baseline: the LM head on the last position only (FL-GLM: every one)")
    parser.add_argument("--clients", type=int, default=0,
                        help="also: this many concurrent clients (in process), trunk steps batched vs one at a time")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 8 and 16 tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.new_tokens, args.head_layers, args.tail_layers = "tiny-llama", "8,16,40", 1, 1
        args.full_rerun_max, args.rerun_stride = 16, 8
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.new_tokens.split(",") if n]

    model, tokenizer = load_model(args.model)
    parts = split_model(model, args.head_layers, args.tail_layers)
    prompt = torch.tensor([encode_prompt(tokenizer, PASSAGE if args.long_prompt else PROMPT)])  # (1, T)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    with tempfile.TemporaryDirectory() as keys:
        server, channel = _serve(parts.trunk, Path(keys), context)
    cached_link, rerun_link = RemoteTrunk(channel), RerunTrunk(channel)
    results: dict[str, dict[str, dict[str, float]]] = {"cached": {}, "rerun": {}}
    ratios: dict[int, list[float]] = {}
    match = True
    load_before = os.getloadavg()[0]
    try:
        for n in lengths:
            pairs = []  # (cached seconds, cached wire, rerun seconds, rerun wire), one per repeat
            for _ in range(args.repeats):
                seconds, wire, rerun_s, rerun_wire, tokens, same = _paired(
                    parts, cached_link, rerun_link, prompt, n, channel,
                    1 if n <= args.full_rerun_max else args.rerun_stride, not args.rerun_last_logits)
                if len(tokens) != n:
                    raise SystemExit(f"{n} new tokens do not fit the context after a {prompt.shape[1]}-token prompt")
                match &= same
                pairs.append((seconds, wire, rerun_s, rerun_wire))
                print(f"  {n:4d} tokens: cached {n / seconds:6.2f} tokens/s, re-run {n / rerun_s:6.2f} tokens/s: "
                      f"{rerun_s / seconds:5.2f}x (load {os.getloadavg()[0]:.1f})", flush=True)
            ratios[n] = [r / c for c, _, r, _ in pairs]
            for mode, column in (("cached", 0), ("rerun", 2)):
                sec = statistics.median(pair[column] for pair in pairs)
                w = pairs[-1][column + 1]  # the bytes do not change between repeats
                results[mode][str(n)] = {"tokens_per_s": round(n / sec, 3), "seconds": round(sec, 3),
                                         "bytes_per_token": round(w / n, 1)}
                print(f"{mode:6s} {n:4d} tokens: {n / sec:8.2f} tokens/s  {w / n:12.0f} bytes/token", flush=True)
    finally:
        channel.close()
        server.stop(grace=1.0)

    result: dict = {"bench": "split_inference", "model": args.model, "threads": args.threads,
                    "prompt_tokens": int(prompt.shape[1]), "cut": [args.head_layers, args.tail_layers],
                    "tokens_match": match, "rerun_stride": args.rerun_stride, "full_rerun_max": args.full_rerun_max,
                    "repeats": args.repeats, "rerun_logits": "last" if args.rerun_last_logits else "all",
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    **results}
    for n in lengths:  # the median of the per-repeat ratios, and their range
        result[f"speedup_{n}"] = round(statistics.median(ratios[n]), 2)
        result[f"speedup_{n}_range"] = [round(min(ratios[n]), 2), round(max(ratios[n]), 2)]
    if args.clients:
        result["client_batching"] = {"clients": args.clients, "new_tokens": lengths[0],
                                     **client_batching(parts, prompt, lengths[0], args.clients)}
    key = "128" if "128" in results["cached"] else str(lengths[-1])
    result["bytes_per_token"] = results["cached"][key]["bytes_per_token"]
    result["rerun_bytes_per_token"] = results["rerun"][key]["bytes_per_token"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
