"""The federated half of the demo: ``simulate`` the federation, then evaluate what it produced.

The server writes the final adapters (LoRA: per part and merged into one PEFT adapter, ``merged``;
P-tuning v2: the three parts' prefixes as one PEFT prefix-tuning adapter, ``prefix``); that one
adapter is loaded into a fresh unsplit model with ``peft.PeftModel.from_pretrained`` — the same
path a user takes to use the result — and evaluated like the other rows of the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.models import load_model
from fedsplit.recipes.common import FederatedData
from fedsplit.recipes.evaluate import EvalResult, evaluate
from fedsplit.recipes.network import simulate


@dataclass
class FederatedResult:
    losses: list[tuple[int, float]]  # (optimizer step over all clients, loss), in time order
    eval: EvalResult
    adapter_dir: Path


def client_loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """All clients' step losses in the order they happened."""
    records = []
    for path in sorted(run_dir.glob("client-*/metrics.jsonl")):
        records += read_metrics(path, "train_step")
    records.sort(key=lambda r: r["time"])
    return [(index + 1, r["loss"]) for index, r in enumerate(records)]


def run_federated(cfg: RunConfig, data: FederatedData, out: Path, metrics: MetricsWriter) -> FederatedResult:
    from peft import PeftModel

    run_dir = Path(out) / "federated"
    server_dir = simulate(cfg, run_dir)
    final = server_dir / "adapters" / cfg.method.final_adapter
    base, tokenizer = load_model(cfg.model.name)
    model = PeftModel.from_pretrained(base, str(final))
    result = evaluate(model, tokenizer, data.eval, cfg)
    metrics.write("eval", mode="federated", loss=result.loss, rouge_l=result.rouge_l)
    return FederatedResult(client_loss_curve(run_dir), result, final)
