"""``fedsplit demo``: zero-shot vs federated split vs centralized on the stdlib-docs silos.

Reads top to bottom: data -> zero-shot evaluation -> federated split training -> centralized
training -> one table, a metrics file, the adapters and a loss-curve plot in the run directory.
Both trainings use the configured method (``[method]``: LoRA, or P-tuning v2 prefixes with the same
``num_virtual_tokens``, docs/ptuning.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter
from fedsplit.models import load_model
from fedsplit.plots import plot_loss_curves
from fedsplit.recipes.centralized import run_centralized
from fedsplit.recipes.common import load_federated_data, prepare_run_dir
from fedsplit.recipes.evaluate import EvalResult, evaluate
from fedsplit.recipes.federated import run_federated


def _row(name: str, result: EvalResult) -> str:
    rouge = "   n/a" if result.rouge_l is None else f"{result.rouge_l:6.4f}"
    return f"| {name:<34} | {result.loss:13.4f} | {rouge:>7} |"


def run_demo(cfg: RunConfig, out: Path) -> int:
    start = time.monotonic()
    out = prepare_run_dir(out, cfg)
    data = load_federated_data(cfg.data, cfg.train.seed)
    method = f"P-tuning v2 (P = {cfg.method.num_virtual_tokens})" if cfg.method.name == "prefix" else "LoRA"
    print(f"clients: {[len(s) for s in data.silos]} examples, held-out: {len(data.eval)}; model {cfg.model.name}, "
          f"{method}")
    with MetricsWriter(out / "metrics.jsonl", fresh=True) as metrics:
        model, tokenizer = load_model(cfg.model.name)
        zero_shot = evaluate(model, tokenizer, data.eval, cfg)
        metrics.write("eval", mode="zero-shot", loss=zero_shot.loss, rouge_l=zero_shot.rouge_l)
        del model

        federated = run_federated(cfg, data, out, metrics)
        centralized = run_centralized(cfg, data, out, metrics)

        how = cfg.strategy.name if cfg.aggregation.mode == "plain" else f"{cfg.strategy.name}, {cfg.aggregation.mode}"
        table = [
            f"| {'model':<34} | held-out loss | ROUGE-L |",
            f"|{'-' * 36}|---------------|---------|",
            _row("zero-shot", zero_shot),
            _row(f"federated split ({how})", federated.eval),
            _row("centralized", centralized.eval),
        ]
        elapsed = time.monotonic() - start
        metrics.write("summary", seconds=elapsed, table=table)
    plot_loss_curves(
        {"federated split (every client step, in time order)": federated.losses, "centralized": centralized.losses},
        out / "loss.png",
        title=f"{method} fine-tuning of {cfg.model.name}: federated split vs centralized",
        xlabel="optimizer steps (all clients)",
        smoothing=5,
    )
    samples = {"federated": federated.eval.samples[:5], "centralized": centralized.eval.samples[:5],
               "zero-shot": zero_shot.samples[:5]}
    (out / "samples.json").write_text(json.dumps(samples, indent=2))
    print("\n".join(table))
    print(f"run directory: {out}  ({elapsed / 60:.1f} min)")
    return 0
