"""Cross-cloud experiments, in process (arXiv 2503.12226 on FL-GLM, arXiv 2406.14898).

Split fine-tuning of a real tiny model (``stories260k``, --quick: ``tiny-llama``) on a labelled task
declared as a data contract (dair-ai/emotion from the shared data: 6 labels, verbalized answers),
with one trunk server and K clients joined by the in-process channel (every message serialized
as on the network). Each client's head/tail adapters start each round from the global ones, train
``local_steps`` split steps on the client's own silo, and go to the strategy; the trunk trains at
every step. Held-out loss: the global head/tail with the trunk, on the task's validation rows.

1. Poisoning: 10 clients on an IID split, 2 of them poisoned. They train honestly (their trunk
   gradients are real) but send a forged update of the client parts, from their own change
   ``d = w_k - w_global``: ``scaled`` ``w_global + s*d``, ``sign-flip`` ``w_global - s*d``, ``random``
   ``w_global + s*rms(d)*N(0, 1)``. Gap = (final loss - clean FedAvg's) / clean FedAvg's, in %.
2. Non-IID: the same 10 clients on a Dirichlet(0.3) label-skew split vs IID, with FedAvg, FedProx,
   FedAdam and the dynamic weights omega_k. The B_k of omega_k are simulated per-client link
   bandwidths (10 to 100 MB/s, fixed by seed; in-process there is no link to measure).

3. Slow link (``bench/slow_link.py``; not in process: a server process and four TLS client sessions):
   client-3 behind a link 10x slower than the others'; sync vs semi-synchronous (and asynchronous /
   per-pass trunk lease where the config has them) rounds: time to the sync run's held-out loss.

``--only`` picks sections (``poisoning``, ``non_iid``, ``slow_link``; default all). Prints a table and,
last, one JSON line with ``robust_loss_gap_pct`` (the worst gap of any robust strategy under any
attack), ``fedavg_poisoned_loss_gap_pct`` (FedAvg's worst), ``async_time_ratio`` and
``async_loss_gap_pct`` (the best non-sync mode's time to the sync loss over the sync wall time, and its
final loss's gap), and the details.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedsplit.adapters import (
    LoraSettings,
    adapter_parameters,
    adapter_state_dict,
    add_part_adapters,
    load_adapter_state_dict,
)
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.data import ClientSource, DataContract, load_client_data, shared_data_dir
from fedsplit.data.partition import dirichlet_labels, iid
from fedsplit.data.tokenize import EncodedExample
from fedsplit.models import load_model
from fedsplit.recipes.common import BatchStream, eval_batches
from fedsplit.server import TrunkServer
from fedsplit.split import SplitParts, split_model
from fedsplit.strategy import (
    BANDWIDTH_METRIC,
    PROXIMAL_MU,
    ClientUpdate,
    Strategy,
    StrategyConfig,
    TooFewResults,
    add_proximal_grad_,
    build_strategy,
)
from fedsplit.train.config import TrainConfig

EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
CONTRACT = DataContract(
    prompt_template="Text: {text}\nEmotion (sadness, joy, love, anger, fear or surprise)?",
    labels=EMOTIONS,
    max_length=64,
)
ATTACKS = ("scaled", "sign-flip", "random")
ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")
NON_IID = ("fedavg", "fedprox", "fedadam", "dynamic")


@dataclass
class Settings:
    model: str
    clients: int
    poisoned: int
    rounds: int
    local_steps: int
    batch: int
    lr: float
    train_rows: int
    eval_rows: int
    attack_scale: float
    seed: int


def settings(quick: bool) -> Settings:
    if quick:
        return Settings("tiny-llama", 6, 1, 1, 1, 2, 5e-3, 36, 4, 100.0, 0)
    return Settings("stories260k", 10, 2, 6, 3, 8, 5e-3, 2000, 100, 100.0, 0)


# -- data: the contract, read once; clients get index silos of the pool ------------------------
@dataclass
class Task:
    train: list[EncodedExample]
    labels: list[str]
    eval: list[dict[str, Tensor]]


def load_task(s: Settings, tokenizer, shared: Path) -> Task:
    contract = DataContract(**{**CONTRACT.__dict__, "tokenizer": s.model})
    folder = shared / "emotion"
    train_source = ClientSource(path=str(folder / "train.jsonl"), limit=s.train_rows)
    held_source = ClientSource(path=str(folder / "validation.jsonl"), limit=s.eval_rows)
    train = load_client_data(contract, [train_source], tokenizer)
    held = load_client_data(contract, [held_source], tokenizer)
    assert train.encoded is not None and held.encoded is not None
    print(f"train report: {json.dumps(train.report.to_dict())}", file=sys.stderr)
    batches = eval_batches(held.encoded, 32, tokenizer.pad_token_id, "right")
    return Task(train.encoded, [str(label) for label in train.labels], batches)


# -- attacks on the client parts (kept apart from training) --------------------------------------
def forge(kind: str, tensors: Mapping[str, Tensor], anchor: Mapping[str, Tensor], scale: float, gen: torch.Generator):
    """A poisoned update built from the attacker's honest one."""
    forged = {}
    for key, value in tensors.items():
        delta = value - anchor[key]
        if kind == "scaled":
            forged[key] = anchor[key] + scale * delta
        elif kind == "sign-flip":
            forged[key] = anchor[key] - scale * delta
        elif kind == "random":
            rms = float(delta.pow(2).mean().sqrt()) or 1e-3
            forged[key] = anchor[key] + scale * rms * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        else:
            raise ValueError(f"attack: expected one of {', '.join(ATTACKS)}, got {kind!r}")
    return forged


# -- one federation, in process ----------------------------------------------------------------
@dataclass
class Model:
    """The split model with LoRA on every part, and its initial adapters (each run starts from them)."""

    parts: SplitParts
    initial_client: dict[str, Tensor]
    initial_trunk: dict[str, Tensor]


def prepare_model(base, seed: int) -> Model:
    parts = split_model(copy.deepcopy(base), 1, 1)
    add_part_adapters(parts, [LoraSettings(r=8)] * 3, seed=seed)
    return Model(parts, client_tensors(parts), adapter_state_dict(parts.trunk))


def client_tensors(parts: SplitParts) -> dict[str, Tensor]:
    return {**{f"head/{k}": v for k, v in adapter_state_dict(parts.head).items()},
            **{f"tail/{k}": v for k, v in adapter_state_dict(parts.tail).items()}}  # fmt: skip


def load_client_tensors(parts: SplitParts, tensors: Mapping[str, Tensor]) -> None:
    load_adapter_state_dict(parts.head, {k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
    load_adapter_state_dict(parts.tail, {k[5:]: v for k, v in tensors.items() if k.startswith("tail/")})


def named_client_parameters(parts: SplitParts) -> dict[str, torch.nn.Parameter]:
    """The head/tail LoRA parameters under the update's keys (``head/...``, ``tail/...``)."""
    return {**{f"head/{k}": p for k, p in adapter_parameters(parts.head).items()},
            **{f"tail/{k}": p for k, p in adapter_parameters(parts.tail).items()}}  # fmt: skip


def run_federation(
    s: Settings,
    model: Model,
    tokenizer,
    task: Task,
    silos: Sequence[Sequence[int]],
    strategy: Strategy,
    *,
    attack: str | None = None,
    bandwidths: Sequence[float] | None = None,
) -> dict:
    cfg = TrainConfig(lr=s.lr, schedule="constant", batch_size=s.batch, max_length=CONTRACT.max_length, seed=s.seed)
    total = s.rounds * s.local_steps * len(silos)
    torch.manual_seed(s.seed)
    parts = model.parts
    load_adapter_state_dict(parts.trunk, model.initial_trunk)  # every run starts from the same adapters
    server = TrunkServer(parts.trunk, cfg, total)
    channel, _ = in_process_channel("sim", lambda kind, rnd, step, msg: server.handle("sim", kind, rnd, step, msg))
    ids = [f"client-{k}" for k in range(len(silos))]
    streams = {cid: BatchStream([task.train[i] for i in silo], s.batch, tokenizer.pad_token_id, "right", s.seed + k)
               for k, (cid, silo) in enumerate(zip(ids, silos, strict=True))}  # fmt: skip
    attackers = set(ids[: s.poisoned]) if attack else set()
    gen = torch.Generator().manual_seed(s.seed + 1)
    global_parts = dict(model.initial_client)
    evaluator = SplitClient(parts.head, parts.tail, channel, cfg, total)
    losses_per_round = []
    for rnd in range(1, s.rounds + 1):
        plan = strategy.configure_round(rnd, ids)
        mu = float(plan.settings.get(PROXIMAL_MU, 0.0))
        updates, round_losses = [], []
        for cid in plan.client_ids:
            load_client_tensors(parts, global_parts)
            client = SplitClient(parts.head, parts.tail, channel, cfg, total)  # a fresh optimizer each round
            client.round = rnd
            params = named_client_parameters(parts)
            losses = []
            for _ in range(int(plan.settings["local_steps"])):
                losses.append(client.forward_backward(streams[cid].next()))
                if mu > 0:
                    add_proximal_grad_(params, global_parts, mu)
                client.optimizer_step()
            tensors = client_tensors(parts)
            if cid in attackers:
                tensors = forge(attack or "", tensors, global_parts, s.attack_scale, gen)
            metrics = {"loss": float(np.mean(losses))}
            round_losses.append(metrics["loss"])
            if bandwidths is not None:
                metrics[BANDWIDTH_METRIC] = bandwidths[ids.index(cid)]
            updates.append(ClientUpdate(cid, tensors, len(silos[ids.index(cid)]), metrics))
        aggregate = strategy.aggregate(rnd, updates, [], global_parts)
        if isinstance(aggregate, TooFewResults):
            raise RuntimeError(aggregate.reason)
        global_parts = aggregate.tensors
        losses_per_round.append(round(float(np.mean(round_losses)), 4))  # the clients' training loss
    return {"final_loss": evaluate(evaluator, parts, global_parts, task), "train_loss": losses_per_round}


def evaluate(evaluator: SplitClient, parts: SplitParts, global_parts: Mapping[str, Tensor], task: Task) -> float:
    """Held-out loss of the global head/tail with the current trunk."""
    load_client_tensors(parts, global_parts)
    loss = evaluator.eval_loss(task.eval)
    return loss if math.isfinite(loss) else float("inf")


def strategy_for(name: str, s: Settings) -> Strategy:
    cfg = StrategyConfig(
        name=name,  # type: ignore[arg-type]
        byzantine=s.poisoned,
        trim_beta=s.poisoned / s.clients,
        mu=0.1,
        eta=3e-2,
        alpha=1.0,
    )
    return build_strategy(cfg, local_steps=s.local_steps, lr=s.lr, min_clients=s.clients, seed=s.seed)


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def worst(gaps: Sequence[float | None]) -> float | None:
    """The largest gap, or None if any run diverged (its loss was not finite)."""
    finite = [g for g in gaps if g is not None]
    return max(finite) if len(finite) == len(gaps) else None


def gap(loss: float, reference: float) -> float | None:
    return round(100 * (loss - reference) / reference, 2) if math.isfinite(loss) else None


SECTIONS = ("poisoning", "non_iid", "slow_link")


def poisoning_and_non_iid(s: Settings, shared: Path, sections: set[str], threads: int) -> dict:
    """Sections 1 and 2 (non-IID reuses the clean FedAvg run of 1 as its fedavg/iid)."""
    base, tokenizer = load_model(s.model)
    model = prepare_model(base, s.seed)
    task = load_task(s, tokenizer, shared)
    clean_silos = iid(len(task.train), s.clients, s.seed)

    # 1. poisoning: clean FedAvg is the reference; every strategy under every attack
    runs: dict[str, dict] = {}
    clean = run_federation(s, model, tokenizer, task, clean_silos, strategy_for("fedavg", s))
    runs["fedavg/clean"] = clean
    reference = clean["final_loss"]
    for name in ("fedavg", *ROBUST) if "poisoning" in sections else ():
        for attack in ATTACKS:
            runs[f"{name}/{attack}"] = run_federation(
                s, model, tokenizer, task, clean_silos, strategy_for(name, s), attack=attack
            )
            print(f"{name:>12} {attack:>9}: loss {runs[f'{name}/{attack}']['final_loss']:.4f} "
                  f"(clean fedavg {reference:.4f})", file=sys.stderr)  # fmt: skip
    gaps = {key: gap(run["final_loss"], reference) for key, run in runs.items()}
    robust_gaps = [gaps[f"{n}/{a}"] for n in ROBUST for a in ATTACKS if f"{n}/{a}" in gaps]
    fedavg_gaps = [gaps[f"fedavg/{a}"] for a in ATTACKS if f"fedavg/{a}" in gaps]

    # 2. non-IID (Dirichlet 0.3) vs IID
    skewed = dirichlet_labels(task.labels, s.clients, 0.3, s.seed)
    rng = np.random.default_rng([s.seed, 7])
    bandwidths = [float(b) for b in 10 ** rng.uniform(7, 8, s.clients)]  # 10-100 MB/s
    non_iid: dict[str, dict] = {}
    for split_name, silos in (("iid", clean_silos), ("dirichlet-0.3", skewed)) if "non_iid" in sections else ():
        for name in NON_IID:
            if (name, split_name) == ("fedavg", "iid"):  # the clean poisoning reference: the same run
                non_iid["fedavg/iid"] = clean
                continue
            run = run_federation(s, model, tokenizer, task, silos, strategy_for(name, s), bandwidths=bandwidths)
            non_iid[f"{name}/{split_name}"] = run
            print(f"{name:>12} {split_name:>13}: loss {run['final_loss']:.4f}", file=sys.stderr)

    return {
        "robust_loss_gap_pct": worst(robust_gaps) if robust_gaps else None,  # None: a run diverged (or not run)
        "fedavg_poisoned_loss_gap_pct": worst(fedavg_gaps) if fedavg_gaps else None,
        "clean_fedavg_loss": round(reference, 4),
        "poisoning_gap_pct": gaps,
        "final_loss": {key: _finite(run["final_loss"]) for key, run in {**runs, **non_iid}.items()},  # None: diverged
        "train_loss_per_round": {key: run["train_loss"] for key, run in {**runs, **non_iid}.items()},
        "label_skew": [dict(sorted(Counter(task.labels[i] for i in silo).items())) for silo in skewed],
        "settings": {**s.__dict__, "threads": threads, "attacks": list(ATTACKS), "partition_alpha": 0.3},
    }


def slow_link_section(quick: bool, shared: Path, args: argparse.Namespace) -> dict:
    """Section 3 (bench/slow_link.py): async_time_ratio and async_loss_gap_pct on top, the details under slow_link."""
    import tempfile

    from slow_link import run_slow_link, slow_link_settings

    s = slow_link_settings(quick)
    s.repeats = args.repeats or s.repeats
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="slow_link-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
        if quick and modes is None:  # the tests: the headline pair and semi_sync (each mode is a server start)
            modes = ["sync", "semi_sync", "async"]
        found = run_slow_link(s, shared, root, deadline_s=args.deadline_s, log=log, modes=modes)
    return {"async_time_ratio": found.pop("async_time_ratio"), "async_loss_gap_pct": found.pop("async_loss_gap_pct"),
            "slow_link": found}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 2 rounds, few rows (for the tests)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=0, help="override the number of rounds (poisoning, non-IID)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=0, help="slow_link: runs of each mode (0: 2, --quick 1)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="slow_link: semi_sync round deadline (0: 0.75 x the first sync run's round time)")
    parser.add_argument("--out", default="", help="slow_link: keep the runs' directories here (default: a temp dir)")
    parser.add_argument("--modes", default="", help="slow_link: modes to run, comma-separated (default: all; "
                                                    "--quick: sync,semi_sync,async); sync is always run")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.only.split(",") if name.strip()}
    if not sections or sections - set(SECTIONS):
        parser.error(f"--only: expected names among {', '.join(SECTIONS)}, got {args.only!r}")
    torch.set_num_threads(args.threads)
    s = settings(args.quick)
    if args.rounds:
        s.rounds = args.rounds
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("cross_cloud needs the shared data (emotion): set FEDSPLIT_SHARED")
    start = time.perf_counter()
    result: dict = {"bench": "cross_cloud", "sections": [name for name in SECTIONS if name in sections]}
    if sections & {"poisoning", "non_iid"}:
        result.update(poisoning_and_non_iid(s, shared, sections, args.threads))
    if "slow_link" in sections:
        result.update(slow_link_section(args.quick, shared, args))
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
