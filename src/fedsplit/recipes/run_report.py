"""How ``fedsplit server`` / ``client`` / ``simulate`` evaluate and report (issue 12, items 1 and 4).

- configuration -> the server's :class:`~fedsplit.server.evaluation.FederatedEvalConfig` and each
  client's :class:`~fedsplit.client.evaluation.LocalEvaluator` (its own share of the held-out
  data) and :class:`~fedsplit.client.evaluation.PrivacyAudit`;
- the end of a run, like ``fedsplit demo``: a table of the rounds (train loss, federated held-out
  metrics, privacy-audit scores), the final model against zero-shot where known, a ``summary``
  event in ``metrics.jsonl`` and ``loss.png`` (loss per round).

``fedsplit simulate`` (:func:`fedsplit.recipes.simulate.run_simulate`) holds every silo on one
machine, so it also scores the base model (zero-shot) and the final merged adapter on the whole
held-out set, centrally.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics

log = logging.getLogger(__name__)


# -- building the pieces from the configuration ---------------------------------------------------
def federated_eval_config(cfg: RunConfig):  # -> fedsplit.server.evaluation.FederatedEvalConfig
    from fedsplit.server.evaluation import FederatedEvalConfig

    return FederatedEvalConfig(enabled=cfg.eval.federated, timeout_s=cfg.eval.federated_timeout_s,
                               baseline=cfg.eval.federated_zero_shot,
                               max_examples=cfg.data.max_eval_examples, max_length=cfg.train.max_length)


def client_held_out(cfg: RunConfig) -> list:
    """This client's own held-out examples: its share (every num_clients-th, from its silo index) of
    the run's held-out set; classification tasks as choice examples (ranked by log-likelihood)."""
    from fedsplit.recipes.common import load_federated_data

    if cfg.data.dataset == "files":
        from fedsplit.data import SourceConfig
        from fedsplit.eval.choices import is_classification, load_choice_examples

        source = SourceConfig(path=cfg.data.eval_path, task=cfg.data.task)
        if is_classification(source.field_mapping()):
            items = load_choice_examples(source)
            items = items[: cfg.data.max_eval_examples] if cfg.data.max_eval_examples else items
            return items[cfg.client.silo :: cfg.data.num_clients]
    held_out = load_federated_data(cfg.data, cfg.train.seed).eval
    return held_out[cfg.client.silo :: cfg.data.num_clients]


def client_evaluator(cfg: RunConfig, tokenizer):  # -> LocalEvaluator | None
    """The client's federated evaluation (None when ``eval.federated`` is off)."""
    if not cfg.eval.federated:
        return None
    from fedsplit.client.evaluation import LocalEvaluator
    from fedsplit.eval.evaluator import EvalSettings

    # The FORWARD bound of the server (RunConfig.max_tokens) fits 2 x batch_size sequences of max_length.
    settings = EvalSettings(max_length=cfg.train.max_length, batch_size=2 * cfg.train.batch_size,
                            max_new_tokens=cfg.eval.max_new_tokens, progress=False)
    return LocalEvaluator(tokenizer, client_held_out(cfg), settings, generate=cfg.eval.federated_generate)


def client_audit(cfg: RunConfig):  # -> PrivacyAudit | None
    """The in-run privacy audit (None when ``privacy.audit`` is off)."""
    if not cfg.privacy.audit:
        return None
    from fedsplit.client.evaluation import PrivacyAudit

    inverter = None
    if cfg.privacy.audit_inverter:
        from fedsplit.attacks.inversion import RidgeInverter

        inverter = RidgeInverter.load(cfg.privacy.audit_inverter)
    return PrivacyAudit(cfg.privacy.audit_samples, cfg.privacy.hidden_noise_std, inverter, seed=cfg.train.seed)


def log_client_reports(metrics: MetricsWriter, client_id: str, evaluator: Any, audit: Any) -> None:
    """The client's own record of what it sent: its evaluation metrics and audit scores per round."""
    for entry in evaluator.history if evaluator is not None else ():
        metrics.write("eval_report", client=client_id, **entry)
    for entry in audit.history if audit is not None else ():
        metrics.write("privacy_audit", client=client_id, **entry)


# -- the end of a run -------------------------------------------------------------------------------
def _fmt(value: float | None, width: int = 9) -> str:
    return f"{'n/a':>{width}}" if value is None or not math.isfinite(value) else f"{value:{width}.4f}"


def audit_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per client and overall: mean and worst token recovery of each audited attack over the rounds."""
    out: dict[str, Any] = {"clients": {}}
    for attack in ("nearest_neighbour", "learned"):
        rows = [r for r in records if isinstance(r.get(attack), (int, float))]
        if not rows:
            continue
        out[f"{attack}_mean"] = sum(r[attack] for r in rows) / len(rows)
        out[f"{attack}_max"] = max(r[attack] for r in rows)
        for cid in sorted({r["client"] for r in rows}):
            own = [r[attack] for r in rows if r["client"] == cid]
            out["clients"].setdefault(cid, {})[attack] = {"mean": sum(own) / len(own), "max": max(own)}
    return out


def round_table(run_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """The rounds of a server run directory as a markdown table, and the numbers behind it."""
    path = Path(run_dir) / "metrics.jsonl"
    ends = {r["round"]: r for r in read_metrics(path, "round_end")}
    evals = {r["round"]: r for r in read_metrics(path, "federated_eval")}
    audits = read_metrics(path, "privacy_audit")
    rows = []
    for number in sorted(ends.keys() | ({0} & evals.keys())):  # round 0: the starting parts (zero-shot), if scored
        pooled = evals.get(number, {}).get("aggregate", {})
        end = ends[number] if number in ends else {"clients": evals[number]["clients"], "metrics": {}}
        row = {"round": number, "clients": len(end["clients"]),
               "train_loss": end["metrics"].get("loss"), "heldout_loss": pooled.get("loss"),
               "examples": int(pooled.get("n", 0)), "accuracy": pooled.get("accuracy")}
        for attack in ("nearest_neighbour", "learned"):  # mean over the round's clients
            scores = [a[attack] for a in audits if a["round"] == number and attack in a]
            row[f"audit_{attack}"] = sum(scores) / len(scores) if scores else None
        rows.append(row)
    columns = [("round", 5), ("clients", 7), ("train loss", 10), ("held-out loss", 13), ("examples", 8)]
    keys = ["round", "clients", "train_loss", "heldout_loss", "examples"]
    if any(r["accuracy"] is not None for r in rows):
        columns.append(("accuracy", 8))
        keys.append("accuracy")
    if audits:
        columns.append(("audit NN", 8))
        keys.append("audit_nearest_neighbour")
    if any(r["audit_learned"] is not None for r in rows):
        columns.append(("audit learned", 13))
        keys.append("audit_learned")
    lines = ["| " + " | ".join(f"{name:>{width}}" for name, width in columns) + " |",
             "|" + "|".join("-" * (width + 2) for _, width in columns) + "|"]
    for row in rows:
        cells = [f"{row[key]:{width}d}" if isinstance(row[key], int) else _fmt(row[key], width)
                 for key, (_, width) in zip(keys, columns, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, {"rounds": rows, "privacy_audit": audit_summary(audits) if audits else None}


def report_run(run_dir: Path, title: str, *, comparison: Mapping[str, Mapping[str, float | None]] | None = None,
               dest: Path | None = None, print_table: bool = True) -> dict[str, Any]:
    """Table, ``summary`` event (in ``dest/metrics.jsonl``) and ``dest/loss.png`` of a finished server
    run directory (``dest``: the run directory itself by default).

    ``comparison``: held-out metrics of whole models (``{"zero-shot": {"loss": .., "rouge_l": ..}, ...}``)
    measured centrally, when the caller holds the held-out data (``fedsplit simulate``).
    """
    from fedsplit.plots import plot_loss_curves

    run_dir = Path(run_dir)
    dest = Path(dest) if dest is not None else run_dir
    lines, numbers = round_table(run_dir)
    if comparison:
        lines += ["", "| model                    | held-out loss | ROUGE-L |",
                  "|--------------------------|---------------|---------|"]
        lines += [f"| {name:<24} | {_fmt(m.get('loss'), 13)} | {_fmt(m.get('rouge_l'), 7)} |"
                  for name, m in comparison.items()]
    audit = numbers["privacy_audit"]
    if audit:
        lines.append("")
        lines.append(f"privacy audit (share of the sent tokens an attacker recovers): nearest neighbour mean "
                     f"{audit['nearest_neighbour_mean']:.4f}, worst {audit['nearest_neighbour_max']:.4f}"
                     + (f"; learned mean {audit['learned_mean']:.4f}, worst {audit['learned_max']:.4f}"
                        if "learned_mean" in audit else ""))
    series = {"train loss (clients, per round)": [(r["round"], r["train_loss"]) for r in numbers["rounds"]
                                                   if r["train_loss"] is not None]}
    held = [(r["round"], r["heldout_loss"]) for r in numbers["rounds"] if r["heldout_loss"] is not None]
    label = "held-out loss (federated evaluation)"
    zero_shot = (comparison or {}).get("zero-shot", {}).get("loss")
    if held and held[0][0] == 0:  # the federation scored the starting parts itself
        label = "held-out loss (federated evaluation; round 0: zero-shot)"
    elif held and zero_shot is not None:
        held.insert(0, (0, float(zero_shot)))
        label = "held-out loss (federated evaluation; round 0: zero-shot)"
    if held:
        series[label] = held
    plot = None
    if any(series.values()):
        plot = plot_loss_curves({k: v for k, v in series.items() if v}, dest / "loss.png", title=title,
                                xlabel="round")
    with MetricsWriter(dest / "metrics.jsonl") as metrics:
        metrics.write("summary", table=lines, comparison=dict(comparison or {}), **numbers)
    if print_table:
        print("\n".join(lines))
        if plot is not None:
            print(f"loss plot: {plot}")
    return {"table": lines, "plot": plot, **numbers}
