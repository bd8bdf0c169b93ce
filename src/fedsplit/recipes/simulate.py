"""``fedsplit simulate``: one server and N client processes on this machine, then a report like the demo's.

Reads top to bottom: the federation (:func:`fedsplit.recipes.network.simulate`) -> zero-shot and
final merged adapter scored centrally on the held-out set (this process holds every silo) -> the
rounds' table with the federated evaluation and privacy audit, ``metrics.jsonl`` and ``loss.png``
in the run directory (:func:`fedsplit.recipes.run_report.report_run`).
"""

from __future__ import annotations

from pathlib import Path

from fedsplit.config import RunConfig
from fedsplit.recipes.network import simulate
from fedsplit.recipes.run_report import report_run


def run_simulate(cfg: RunConfig, out: Path) -> int:
    """``fedsplit simulate``: the federation, then zero-shot vs final on the held-out set, and the report."""
    from peft import PeftModel

    from fedsplit.models import load_model
    from fedsplit.recipes.common import load_federated_data
    from fedsplit.recipes.evaluate import evaluate

    server_dir = simulate(cfg, out)
    data = load_federated_data(cfg.data, cfg.train.seed)
    comparison: dict[str, dict[str, float | None]] = {}
    if data.eval:
        base, tokenizer = load_model(cfg.model.name)
        zero = evaluate(base, tokenizer, data.eval, cfg)
        comparison["zero-shot"] = {"loss": zero.loss, "rouge_l": zero.rouge_l}
        model = PeftModel.from_pretrained(base, str(server_dir / "adapters" / cfg.method.final_adapter))
        final = evaluate(model, tokenizer, data.eval, cfg)
        comparison["federated split (final)"] = {"loss": final.loss, "rouge_l": final.rouge_l}
    report_run(server_dir, f"federated split fine-tuning of {cfg.model.name}", comparison=comparison, dest=out)
    print(f"federation complete; adapters in {server_dir / 'adapters'}; report in {out / 'metrics.jsonl'}")
    return 0
