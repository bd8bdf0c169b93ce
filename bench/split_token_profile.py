"""Where the milliseconds of one cached split token go, against the unsplit model's floor (issue 11).

Split generation with KV caches (FedSEA-LLaMA, arXiv 2505.15683) against re-running the prefix
(FL-GLM, arXiv 2406.14898): the speedup is (a re-run step over the whole prefix) / (a cached
step). This script measures both sides of that ratio, on SmolLM2-135M with the bench's cut
(2 | 26 | 2), greedy, 1 thread, over the same loopback gRPC session as ``split_inference.py``
(TLS, signed handshake, AES-GCM frames):

* floors: the unsplit model's own cached decoding step (``DynamicCache``, last logits only), and
  the bare weight pass: every ``nn.Linear`` of the model once on one row (a decoding step reads
  every weight once: at fp32 that is ~540 MB per token);
* the split step in process (``LocalTrunk``) and over gRPC, cut into client head, client tail
  blocks, final norm + LM head (49k vocab), sampling, server trunk blocks, server handling (open,
  parse, checks, seal) and transport (gRPC both ways: the client's exchange minus the server's
  handling), and of those the masks (``cache_masks``) of all three parts;
* a re-run step (head, trunk FORWARD, tail with all positions' logits, as FL-GLM's code) at the
  prefix lengths a 128-token generation goes through.

Every section runs once per repeat, in turn (the machine is shared; medians of per-token times).

    OMP_NUM_THREADS=1 python bench/split_token_profile.py                 # ~3 minutes on a quiet machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedsplit.channel import ServerSession
from fedsplit.inference import LocalTrunk, SamplingSettings, encode_prompt, iter_tokens
from fedsplit.inference import generate as generate_module
from fedsplit.inference.baseline import rerun_step
from fedsplit.inference.remote import RemoteTrunk, RerunTrunk
from fedsplit.models import load_model
from fedsplit.server import generation as generation_module
from fedsplit.split import split_model
from fedsplit.split.parts import SplitPart

Timings = dict[str, list[float]]


def _timed(timings: Timings, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[name].append(time.perf_counter() - start)

    return wrapper


@contextlib.contextmanager
def _patched(target: Any, name: str, timings: Timings, label: str) -> Iterator[None]:
    """``target.name`` timed into ``timings[label]`` for the duration (a module, class or instance attribute)."""
    own = name in vars(target)
    original = getattr(target, name) if not own else vars(target)[name]
    setattr(target, name, _timed(timings, label, getattr(target, name)))
    try:
        yield
    finally:
        setattr(target, name, original) if own else delattr(target, name)


def _module_timer(module: torch.nn.Module, timings: Timings, label: str) -> list[Any]:
    """Forward hooks that time ``module``'s calls."""
    starts: list[float] = []
    pre = module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    post = module.register_forward_hook(lambda *_: timings[label].append(time.perf_counter() - starts.pop()))
    return [pre, post]


def unsplit_step(model: Any, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Median seconds of the unsplit model's cached decoding step, and its greedy tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    times, tokens = [], []
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for _ in range(n):
            token = out.logits[:, -1].argmax(-1)  # (1,)
            tokens.append(int(token))
            start = time.perf_counter()
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def weight_pass(model: Any, passes: int = 5) -> float:
    """Median seconds of every ``nn.Linear`` once on one row: the weights a decoding step must read."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = [torch.randn(1, m.in_features) for m in linears]
    times = []
    with torch.no_grad():
        for _ in range(passes):
            start = time.perf_counter()
            for linear, row in zip(linears, rows, strict=True):
                torch.nn.functional.linear(row, linear.weight, linear.bias)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def split_steps(parts: Any, link: Any, prompt: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """Seconds between consecutive tokens of cached split generation (the prefill excluded), and the tokens."""
    times, tokens = [], []
    last = time.perf_counter()
    for token in iter_tokens(parts.head, parts.tail, link, prompt, None, SamplingSettings(max_new_tokens=n)):
        now = time.perf_counter()
        times.append(now - last)
        last = now
        tokens.append(int(token[0]))
    return times[1:], tokens


def profiled_grpc(parts: Any, channel: Any, prompt: torch.Tensor, n: int) -> dict[str, float]:
    """Median milliseconds per token of each stage of a cached split step over gRPC."""
    timings: Timings = defaultdict(list)
    link = RemoteTrunk(channel)
    hooks = _module_timer(parts.tail.get_submodule(parts.tail.spec.norm), timings, "norm")
    hooks += _module_timer(parts.tail.get_submodule(parts.tail.spec.lm_head), timings, "lm head")
    with contextlib.ExitStack() as stack:
        for target, name, label in (
            (generate_module, "head_cached", "client head"), (generate_module, "tail_cached", "client tail"),
            (generate_module, "next_tokens", "sampling"), (generation_module, "run_blocks_cached", "server blocks"),
            (generation_module.GenerationService, "handle", "server handle"),
            (ServerSession, "handle_parts", "server session"),
            (channel.transport, "exchange", "exchange"), (link, "step", "trunk call"),
            (SplitPart, "cache_masks", "masks"),
        ):
            stack.enter_context(_patched(target, name, timings, label))
        steps, _ = split_steps(parts, link, prompt, n)
    for hook in hooks:
        hook.remove()

    def per_token(label: str, calls_per_token: int = 1) -> float:  # the prefill's call(s) dropped
        values = timings[label][calls_per_token:]
        return 1e3 * calls_per_token * statistics.median(values) if values else 0.0

    total = 1e3 * statistics.median(steps)
    norm_lm = per_token("norm") + per_token("lm head")
    row = {
        "client head (embedding + blocks)": per_token("client head"),
        "client tail blocks": per_token("client tail") - norm_lm,
        "final norm + LM head (whole vocabulary)": norm_lm,
        "sampling (greedy)": per_token("sampling"),
        "server trunk blocks": per_token("server blocks"),
        "server step handler (decode, checks, encode)": per_token("server handle") - per_token("server blocks"),
        "server session (parse, AES-GCM open/seal)": per_token("server session") - per_token("server handle"),
        "transport (gRPC both ways, thread hand-offs)": per_token("exchange") - per_token("server session"),
        "client framing (encode, seal, open, decode)": per_token("trunk call") - per_token("exchange"),
    }
    row["other (Python between stages)"] = total - sum(row.values())
    row["total"] = total
    row["of which masks (3 parts)"] = per_token("masks", 3)
    return row


def main() -> dict:
    import split_inference as bench  # the same prompt and server as the bench (bench/ is on sys.path)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per profiled generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rerun-lengths", default="57,121,184", help="prefix lengths of the timed re-run steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    parts = split_model(model, 2, 2)
    prompt = torch.tensor([encode_prompt(tokenizer, bench.PROMPT)])  # (1, T)
    with tempfile.TemporaryDirectory() as keys:
        server, channel = bench._serve(parts.trunk, Path(keys), 8192)
    samples: dict[str, list[float]] = defaultdict(list)
    stages: list[dict[str, float]] = []
    try:
        for repeat in range(args.repeats):
            unsplit, reference = unsplit_step(model, prompt, args.new_tokens)
            samples["unsplit cached step"].append(1e3 * unsplit)
            samples["weight pass (every Linear once)"].append(1e3 * weight_pass(model))
            local, tokens = split_steps(parts, LocalTrunk(parts.trunk), prompt, args.new_tokens)
            samples["split step, in process"].append(1e3 * statistics.median(local))
            if tokens != reference:
                raise SystemExit("the split tokens differ from the unsplit model's")
            stages.append(profiled_grpc(parts, channel, prompt, args.new_tokens))
            samples["split step, loopback gRPC"].append(stages[-1]["total"])
            link = RerunTrunk(channel)
            for length in (int(n) for n in args.rerun_lengths.split(",")):
                ids = torch.randint(0, int(model.config.vocab_size), (1, length))  # the cost does not depend on the ids
                start = time.perf_counter()
                rerun_step(parts.head, parts.tail, link.forward, ids)
                samples[f"re-run step, {length}-token prefix"].append(1e3 * (time.perf_counter() - start))
            print(f"repeat {repeat + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        channel.close()
        server.stop(grace=1.0)

    summary = {name: round(statistics.median(v), 2) for name, v in samples.items()}
    spread = {name: [round(min(v), 2), round(max(v), 2)] for name, v in samples.items()}
    breakdown = {name: round(statistics.median(s[name] for s in stages), 2) for name in stages[0]}
    for name, value in summary.items():
        print(f"{name:40s} {value:8.1f} ms  [{spread[name][0]:.1f} .. {spread[name][1]:.1f}]")
    print("cached split step over gRPC, per token:")
    for name, value in breakdown.items():
        print(f"  {name:44s} {value:7.2f} ms  {100 * value / breakdown['total']:5.1f}%")
    reruns = [v for k, v in summary.items() if k.startswith("re-run")]
    result = {"bench": "split_token_profile", "model": args.model, "threads": args.threads,
              "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "ms": summary, "ms_range": spread, "grpc_step_ms": breakdown,
              "rerun_over_cached": round(statistics.mean(reruns) / summary["split step, loopback gRPC"], 2),
              "unsplit_floor_fraction": round(summary["unsplit cached step"] / summary["split step, loopback gRPC"], 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
