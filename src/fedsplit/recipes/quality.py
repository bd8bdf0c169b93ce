"""The FL-GLM comparison at small scale: zero-shot, local-only, federated split and centralized.

FL-GLM (arXiv 2406.14898) reports that federated split fine-tuning is comparable to centralized
fine-tuning on SuperGLUE and summarization. Per task this recipe measures, on the same held-out set:

- **zero-shot**: the base model;
- **local-only**: each client fine-tunes alone on its own silo (the very batches it trains on in the
  federation), mean over clients;
- **federated split**: ``num_clients`` clients, IID and Dirichlet(alpha) label-skewed silos,
  :func:`fedsplit.recipes.inprocess.train_federated` (the network run's math, in one process);
- **centralized**: the unsplit model on the pooled silos, as many optimizer steps as the
  federation takes in total (so as many examples seen), same LoRA, optimizer, schedule, seed.

Reads top to bottom: data -> partitions -> the four rows per task -> table, JSON, bar chart.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.data import Example, SourceConfig, load_examples
from fedsplit.data.partition import dirichlet_labels, iid
from fedsplit.eval.choices import ChoiceExample, load_choice_examples
from fedsplit.eval.evaluator import EvalSettings, evaluate_split
from fedsplit.eval.scoring import unsplit_access
from fedsplit.models import load_model
from fedsplit.recipes.inprocess import round_steps, silo_batches, train_federated
from fedsplit.split import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig

CLASSIFICATION = ("rte", "cb", "copa", "boolq")
GENERATION = ("samsum",)
TASK_FILES = {  # (train, held-out) under the shared data directory
    "rte": ("superglue/rte/train.jsonl", "superglue/rte/val.jsonl"),
    "cb": ("superglue/cb/train.jsonl", "superglue/cb/val.jsonl"),
    "copa": ("superglue/copa/train.jsonl", "superglue/copa/val.jsonl"),
    "boolq": ("superglue/boolq/train.jsonl", "superglue/boolq/val.jsonl"),
    "samsum": ("samsum/validation.jsonl", "samsum/validation.jsonl"),  # split deterministically below
}
HEADLINE = {"classification": "accuracy", "generation": "rougeL"}


@dataclass
class QualityConfig:
    """One comparison; every method of a task uses the same settings."""

    model: str = field(default="smollm2-135m", metadata={"help": "base model"})
    tasks: tuple[str, ...] = field(default=CLASSIFICATION + GENERATION, metadata={"help": "tasks to compare on"})
    partitions: tuple[str, ...] = field(default=("iid", "dirichlet"), metadata={"help": "iid and/or dirichlet"})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet label-skew concentration"})
    num_clients: int = field(default=3, metadata={"help": "federated clients"})
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    local_steps: int = field(default=4, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = field(default=4, metadata={"help": "examples per step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (cosine schedule), every part"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every part"})
    max_length: int = field(default=192, metadata={"help": "tokens per training/scored sequence"})
    max_eval: int = field(default=80, metadata={"help": "held-out examples per task (0 = all)"})
    samsum_test: int = field(default=80, metadata={"help": "SAMSum: dialogues held out of validation.jsonl"})
    max_new_tokens: int = field(default=48, metadata={"help": "SAMSum summary length"})
    local_only: bool = field(default=True, metadata={"help": "also train each client alone"})
    exact_match: bool = field(default=True, metadata={"help": "classification: also greedy answers (exact match)"})
    seed: int = field(default=0)
    progress: bool = field(default=True)

    def __post_init__(self) -> None:
        self.tasks, self.partitions = tuple(self.tasks), tuple(self.partitions)
        unknown = [t for t in self.tasks if t not in TASK_FILES]
        if unknown or not self.tasks:
            raise ValueError(f"quality.tasks: expected some of {', '.join(TASK_FILES)}, got {unknown}")
        if not set(self.partitions) <= {"iid", "dirichlet"} or not self.partitions:
            raise ValueError(f"quality.partitions: expected iid and/or dirichlet, got {self.partitions}")
        for name in ("num_clients", "rounds", "local_steps", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"quality.{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, max_length=self.max_length, seed=self.seed)

    @property
    def lora(self) -> list[LoraSettings]:
        return [LoraSettings(r=self.lora_r, alpha=2.0 * self.lora_r)] * 3

    @property
    def examples_per_client(self) -> int:
        return self.rounds * self.local_steps * self.batch_size


@dataclass
class TaskData:
    name: str
    kind: str  # classification or generation
    train: list[Example]
    strata: list[Any]  # the label skew's "label" of each training example
    test: list[ChoiceExample] | list[Example]


def load_task(name: str, shared: Path, cfg: QualityConfig) -> TaskData:
    """Training examples (seeded shuffle) and the held-out set; SAMSum's file is split in two."""
    train_file, test_file = (str(shared / f) for f in TASK_FILES[name])
    rng = random.Random(cfg.seed)
    if name in GENERATION:
        everything = load_examples(SourceConfig(path=train_file, task=name))
        rng.shuffle(everything)
        test, train = everything[: cfg.samsum_test], everything[cfg.samsum_test :]
        terciles = sorted(len(e.response) for e in train)
        cuts = (terciles[len(train) // 3], terciles[2 * len(train) // 3])
        strata: list[Any] = [sum(len(e.response) > c for c in cuts) for e in train]  # short / medium / long summary
        return TaskData(name, "generation", train, strata, test[: cfg.max_eval or None])
    items = load_choice_examples(SourceConfig(path=train_file, task=name))
    rng.shuffle(items)
    held_out = load_choice_examples(SourceConfig(path=test_file, task=name, limit=cfg.max_eval or None))
    return TaskData(name, "classification", [i.example for i in items], [i.gold for i in items], held_out)


def partition(data: TaskData, how: str, cfg: QualityConfig) -> list[list[Example]]:
    """Client silos over the first ``num_clients * examples_per_client`` training examples (or all)."""
    pool = min(len(data.train), cfg.num_clients * cfg.examples_per_client)
    if how == "iid":
        silos = iid(pool, cfg.num_clients, cfg.seed)
    else:
        silos = dirichlet_labels(data.strata[:pool], cfg.num_clients, cfg.alpha, cfg.seed, min_size=cfg.batch_size)
    return [[data.train[i] for i in silo] for silo in silos]


# -- the four methods ----------------------------------------------------------------------------
def _evaluate(model, tokenizer, data: TaskData, cfg: QualityConfig) -> dict[str, float]:
    model.eval()
    settings = EvalSettings(max_length=cfg.max_length, batch_size=8, max_new_tokens=cfg.max_new_tokens,
                            exact_match=cfg.exact_match, seed=cfg.seed, progress=cfg.progress)
    return evaluate_split(unsplit_access(model, tokenizer), tokenizer, data.test, settings).metrics


def _train_unsplit(model, steps: Sequence[Sequence[dict]], cfg: QualityConfig) -> list[float]:
    """LoRA on the unsplit model (adapters placed and initialized as in the split run), given steps."""
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, cfg.lora, seed=cfg.seed)
    params = [p for part in parts for p in trainable_parameters(part)]
    trainer = CentralizedTrainer(model, params, cfg.train, total_steps=len(steps))
    model.train()
    return [trainer.train_step(micro).loss for micro in tqdm(steps, desc="unsplit LoRA", unit="step",
                                                             disable=not cfg.progress, leave=False)]


def run_centralized(data: TaskData, silos: list[list[Example]], cfg: QualityConfig) -> dict[str, float]:
    model, tokenizer = load_model(cfg.model)
    pooled = silo_batches([e for silo in silos for e in silo], tokenizer, cfg.train)
    total = cfg.rounds * cfg.local_steps * cfg.num_clients  # as many steps (and examples) as the federation
    losses = _train_unsplit(model, round_steps(pooled, cfg.train, 0, total), cfg)
    return _evaluate(model, tokenizer, data, cfg) | {"train_loss_last_round": _last_round(losses, cfg)}


def run_local_only(data: TaskData, silos: list[list[Example]], cfg: QualityConfig) -> dict[str, float]:
    """Each client alone on exactly the batches it trains on in the federation; metrics averaged."""
    reports = []
    for silo in silos:
        model, tokenizer = load_model(cfg.model)
        batches = silo_batches(silo, tokenizer, cfg.train)
        losses = _train_unsplit(model, round_steps(batches, cfg.train, 0, cfg.rounds * cfg.local_steps), cfg)
        last = {"train_loss_last_round": mean(losses[-cfg.local_steps :])}
        reports.append(_evaluate(model, tokenizer, data, cfg) | last)
    return {name: mean(r[name] for r in reports) for name in reports[0]} | {"clients": len(reports)}


def run_federated(data: TaskData, silos: list[list[Example]], cfg: QualityConfig) -> dict[str, float]:
    model, tokenizer = load_model(cfg.model)
    batches = [silo_batches(silo, tokenizer, cfg.train) for silo in silos]
    _, losses = train_federated(model, batches, cfg.train, cfg.lora, rounds=cfg.rounds, local_steps=cfg.local_steps,
                                progress=cfg.progress)
    return _evaluate(model, tokenizer, data, cfg) | {"train_loss_last_round": _last_round(losses, cfg)}


def _last_round(losses: Sequence[float], cfg: QualityConfig) -> float:
    """Mean training loss over the last round's steps of all clients (the same span for centralized)."""
    return mean(losses[-cfg.local_steps * cfg.num_clients :])


# -- the comparison ------------------------------------------------------------------------------
def compare_task(data: TaskData, cfg: QualityConfig) -> dict[str, dict[str, float]]:
    model, tokenizer = load_model(cfg.model)
    rows = {"zero-shot": _evaluate(model, tokenizer, data, cfg)}
    del model
    silos = {how: partition(data, how, cfg) for how in cfg.partitions}
    for how in cfg.partitions:
        if cfg.local_only:
            rows[f"local-only ({how})"] = run_local_only(data, silos[how], cfg)
        rows[f"federated split ({how})"] = run_federated(data, silos[how], cfg)
    rows["centralized"] = run_centralized(data, silos[cfg.partitions[0]], cfg)  # pooled silos: same for every partition
    for name, silo_list in silos.items():
        rows[f"federated split ({name})"]["silo_sizes"] = [len(s) for s in silo_list]  # type: ignore[assignment]
    return rows


def headline(kind: str, metrics: dict[str, float]) -> float:
    return 100 * metrics[HEADLINE[kind]]


def summarize(results: dict[str, dict], cfg: QualityConfig) -> dict[str, Any]:
    """Gaps in points (x100): centralized minus federated (IID first), federated minus local-only."""
    summary: dict[str, Any] = {"bench": "quality", "model": cfg.model}
    for how in cfg.partitions:
        suffix = "" if how == cfg.partitions[0] else f"_{how}"
        fed = f"federated split ({how})"
        cls = [t for t, r in results.items() if r["kind"] == "classification"]
        gen = [t for t, r in results.items() if r["kind"] == "generation"]
        if cls:
            summary[f"mean_accuracy_gap_points{suffix}"] = mean(
                headline("classification", results[t]["rows"]["centralized"])
                - headline("classification", results[t]["rows"][fed]) for t in cls)
            if cfg.local_only:
                summary[f"mean_accuracy_over_local_points{suffix}"] = mean(
                    headline("classification", results[t]["rows"][fed])
                    - headline("classification", results[t]["rows"][f"local-only ({how})"]) for t in cls)
        if gen:
            summary[f"rouge_l_gap{suffix}"] = mean(
                headline("generation", results[t]["rows"]["centralized"])
                - headline("generation", results[t]["rows"][fed]) for t in gen)
    summary["partition_of_unsuffixed_gaps"] = cfg.partitions[0]
    return summary


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| task | method | accuracy / ROUGE-L (x100) | 95 % interval | macro-F1 / ROUGE-1 | loss |",
             "|---|---|---|---|---|---|"]
    for task, result in results.items():
        kind = result["kind"]
        key = HEADLINE[kind]
        for method, m in result["rows"].items():
            interval = (f"[{100 * m[key + '_ci_low']:.1f}, {100 * m[key + '_ci_high']:.1f}]"
                        if key + "_ci_low" in m else "")
            second = m.get("macro_f1", m.get("rouge1", float("nan")))
            loss = f"{m['loss']:.3f}" if "loss" in m else ""
            lines.append(f"| {task} | {method} | {100 * m[key]:.1f} | {interval} | {100 * second:.1f} | {loss} |")
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    methods = list(next(iter(results.values()))["rows"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks)), 4))
    for i, method in enumerate(methods):
        values = [headline(results[t]["kind"], results[t]["rows"][method]) for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({'ROUGE-L' if results[t]['kind'] == 'generation' else 'accuracy'})" for t in tasks])
    ax.set_ylabel("x100")
    ax.set_title("held-out quality: zero-shot, local-only, federated split, centralized")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(cfg: QualityConfig, shared: Path, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Every task, every method; writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``out``.

    ``resume``: keep the tasks an earlier run into ``out`` measured with the same settings (every
    field but ``tasks`` and ``progress``) and run only the others; other settings are refused.
    """
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    results, minutes = measured_tasks(cfg, out / "quality.json") if resume else ({}, 0.0)
    table = ""
    for task in cfg.tasks:  # the outputs are rewritten after every task: a cut-short run keeps what it measured
        if task in results:
            print(f"{task}: kept from {out / 'quality.json'}")
            continue
        data = load_task(task, shared, cfg)
        print(f"{task}: {len(data.train)} training examples available, {len(data.test)} held out ({data.kind})")
        results[task] = {"kind": data.kind, "n_test": len(data.test), "rows": compare_task(data, cfg)}
        summary = summarize(results, cfg) | {"minutes": minutes + (time.monotonic() - start) / 60}
        table = write_outputs(results, summary, cfg, out)
    summary = summarize(results, cfg) | {"minutes": minutes + (time.monotonic() - start) / 60}
    if not table:  # every task was kept
        table = write_outputs(results, summary, cfg, out)
    print(table)
    return summary


def measured_tasks(cfg: QualityConfig, path: Path) -> tuple[dict[str, dict], float]:
    """The results of ``path`` (an earlier run's quality.json) if its settings are ``cfg``'s (``{}`` if
    there is none), and the minutes that run took."""
    if not path.is_file():
        return {}, 0.0
    record = json.loads(path.read_text())
    ours, theirs = asdict(cfg), dict(record.get("config", {}))
    differ = sorted(k for k in ours if k not in ("tasks", "progress") and _plain(ours[k]) != _plain(theirs.get(k)))
    if differ:
        raise ValueError(f"quality --resume: {path} was measured with other settings: "
                         + ", ".join(f"{k} = {theirs.get(k)!r} there, {ours[k]!r} now" for k in differ))
    kept = {task: result for task, result in record.get("results", {}).items() if task in cfg.tasks}
    return kept, float(record.get("summary", {}).get("minutes", 0.0))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # JSON keeps tuples as lists


def write_outputs(results: dict[str, dict], summary: dict[str, Any], cfg: QualityConfig, out: Path) -> str:
    table = markdown_table(results)
    record = {"config": asdict(cfg), "results": results, "summary": summary}
    (out / "quality.json").write_text(json.dumps(record, indent=2))
    (out / "quality.md").write_text(table + "\n")
    plot_results(results, out / "quality.png")
    return table


def threads(count: int) -> None:
    torch.set_num_threads(count)
