"""``fedsplit eval``: one model on one task's held-out file, with intervals; optionally JSON out.

The model is the plain base model (zero-shot), or the base model with a run's PEFT adapter loaded by
``peft.PeftModel.from_pretrained`` (the path a user takes to use a federated or centralized result):
a LoRA run's merged adapter, or a P-tuning v2 run's one prefix-tuning adapter (``adapters/prefix``,
docs/ptuning.md; the unsplit PEFT prefix model computes what the split parts with their prefixes do).
Reads top to bottom: data -> model -> evaluate -> table (+ JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedsplit.data import Example, SourceConfig, load_examples
from fedsplit.eval.choices import ChoiceExample, is_classification, load_choice_examples
from fedsplit.eval.evaluator import EvalReport, EvalSettings, evaluate_split
from fedsplit.eval.stats import CI_HIGH, CI_LOW, CONFUSION_PREFIX

# Where runs keep their one PEFT adapter, relative to the run directory: "merged" for LoRA (the three
# part adapters merged), "prefix" for P-tuning v2 (the three parts' prefixes in one prefix-tuning adapter).
ADAPTER_LOCATIONS = (
    "adapters/merged",  # fedsplit server
    "adapters/prefix",  # fedsplit server, method.name = "prefix"
    "server/adapters/merged",  # fedsplit simulate
    "server/adapters/prefix",
    "adapters/centralized",  # fedsplit centralized (LoRA or prefix)
    "federated/server/adapters/merged",  # fedsplit demo (its federated result)
    "federated/server/adapters/prefix",
)


def find_adapter(run_dir: Path) -> Path:
    """The PEFT adapter of a run directory: merged LoRA or P-tuning v2 prefixes (or the directory itself
    if it is an adapter).

    A directory holding several (``fedsplit demo``: federated and centralized) must be made precise.
    """
    run_dir = Path(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        return run_dir
    found = [run_dir / rel for rel in ADAPTER_LOCATIONS if (run_dir / rel / "adapter_config.json").is_file()]
    if len(found) > 1:
        raise ValueError(f"{run_dir}: several adapters ({', '.join(map(str, found))}); pass one of them to --run")
    if not found:
        raise FileNotFoundError(f"{run_dir}: no merged LoRA adapter and no prefix adapter (an adapter_config.json "
                                f"in one of {', '.join(ADAPTER_LOCATIONS)}); pass a run directory or the "
                                "adapter directory itself")
    return found[0]


def load_eval_model(model: str | None, run: Path | None):
    """(model, tokenizer, description): the base model, with the run's adapter (LoRA or prefix) if given."""
    from fedsplit.models import load_model

    adapter = find_adapter(run) if run is not None else None
    if model is None:
        config = json.loads((adapter / "adapter_config.json").read_text()) if adapter else {}
        model = config.get("base_model_name_or_path") or "smollm2-135m"
    base, tokenizer = load_model(model)
    if adapter is None:
        return base, tokenizer, f"{model} (zero-shot)"
    from peft import PeftModel

    kind = " (prefix tuning)" if adapter_method(adapter) == "prefix" else ""
    return PeftModel.from_pretrained(base, str(adapter)), tokenizer, f"{model} + {adapter}{kind}"


def adapter_method(adapter: Path) -> str:
    """``"prefix"`` for a PEFT prefix-tuning adapter (a P-tuning v2 run), ``"lora"`` otherwise."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return "prefix" if config.get("peft_type") == "PREFIX_TUNING" else "lora"


STDLIB_DOCS = "stdlib-docs"  # --data stdlib-docs: the demo's built-in held-out set


def stdlib_docs_held_out(limit: int | None) -> list[Example]:
    """The held-out docstring questions of ``fedsplit demo`` with its default data settings."""
    from fedsplit.config import DataConfig, TrainConfig
    from fedsplit.data import stdlib_docs_silos

    data = DataConfig()
    held_out = list(stdlib_docs_silos(data.num_clients, data.eval_fraction, TrainConfig().seed).eval)
    return held_out[:limit] if limit else held_out


def load_eval_data(source: SourceConfig) -> list[ChoiceExample] | list[Example]:
    """Classification items (with every label's candidate) if the task has a verbalizer, else examples."""
    if is_classification(source.field_mapping()):
        return load_choice_examples(source)
    return load_examples(source)


def evaluate_model(model, tokenizer, data, settings: EvalSettings) -> EvalReport:
    from fedsplit.eval.scoring import unsplit_access

    model.eval()
    return evaluate_split(unsplit_access(model, tokenizer), tokenizer, data, settings)


def format_report(report: EvalReport) -> str:
    """``| metric | value | 95 % interval |`` rows (confusion counts left to the JSON)."""
    rows = ["| metric | value | 95 % interval |", "|---|---|---|"]
    for name, value in report.metrics.items():
        if name.endswith((CI_LOW, CI_HIGH)) or name.startswith(CONFUSION_PREFIX):
            continue
        low, high = report.metrics.get(name + CI_LOW), report.metrics.get(name + CI_HIGH)
        interval = f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        shown = f"{int(value)}" if name in ("n", "tokens") else f"{value:.4f}"
        rows.append(f"| {name} | {shown} | {interval} |")
    return "\n".join(rows)


@dataclass
class EvalRun:
    source: SourceConfig | None  # None: the built-in stdlib-docs held-out set
    model: str | None = None
    run: Path | None = None
    json_out: Path | None = None
    limit: int | None = None  # for the built-in set (a SourceConfig carries its own)


def run_eval(job: EvalRun, settings: EvalSettings) -> EvalReport:
    data = load_eval_data(job.source) if job.source is not None else stdlib_docs_held_out(job.limit)
    path = job.source.path if job.source is not None else STDLIB_DOCS
    if not data:
        raise ValueError(f"{path}: no examples to evaluate")
    model, tokenizer, description = load_eval_model(job.model, job.run)
    report = evaluate_model(model, tokenizer, data, settings)
    task = STDLIB_DOCS if job.source is None else job.source.task or "custom"
    print(f"{task} on {path}: {report.n} examples, {report.kind}; model {description}")
    print(format_report(report))
    if job.json_out is not None:
        job.json_out.parent.mkdir(parents=True, exist_ok=True)
        record = {"task": task, "data": path, "model": description,
                  "kind": report.kind, "n": report.n, "metrics": report.metrics, "settings": asdict(settings),
                  "samples": report.samples}
        job.json_out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        print(f"-> {job.json_out}")
    return report
