"""Federated evaluation between rounds (issue 12, items 1 and 5): each client scores its own held-out
data through the split; the server pools the reports exactly and refuses impossible ones."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.adapters import load_adapter_state_dict
from fedsplit.client.evaluation import LocalEvaluator, PrivacyAudit, local_metrics
from fedsplit.client.runner import load_client_adapters
from fedsplit.data import Example
from fedsplit.eval.evaluator import EvalSettings
from fedsplit.eval.scoring import unsplit_access
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.models import load_model
from fedsplit.protocol import ProtocolError, pb
from fedsplit.recipes.run_report import report_run
from fedsplit.server.evaluation import FederatedEvalConfig, check_eval_report
from fedsplit.server.rounds import ROUND_NEXT, RoundStage

from .federation import build_model, make_federation
from tiny import CB_ROWS

SETTINGS = EvalSettings(max_length=32, batch_size=2, progress=False)
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _held_out(n: int, offset: int) -> list[Example]:
    prompts = [f"Repeat: {' '.join(WORDS[(i + offset) % 8 :])}" for i in range(n)]
    answers = [" ".join(WORDS[i % 8 : i % 8 + 2 + i % 3]) for i in range(n)]
    return [Example.from_pair(p, a, source=f"test:{offset}", id=f"{offset}-{i}")
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-llama")[1]


def _federation(tmp_path, tokenizer, sizes: dict[str, int], rounds: int = 2):
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(list(sizes), num_rounds=rounds, local_steps=2, metrics=metrics,
                          evaluation=FederatedEvalConfig(enabled=True, timeout_s=30.0))
    data = {cid: _held_out(n, offset=k) for k, (cid, n) in enumerate(sizes.items())}
    for cid, runner in fed.runners.items():
        runner.evaluator = LocalEvaluator(tokenizer, data[cid], SETTINGS)
    return fed, metrics, data


def test_the_evaluating_stage_sits_between_aggregating_and_the_next_round():
    assert RoundStage.EVALUATING in ROUND_NEXT[RoundStage.AGGREGATING]
    assert RoundStage.EVALUATING in ROUND_NEXT[RoundStage.WAITING_FOR_CLIENTS]  # round 0, before any training
    assert ROUND_NEXT[RoundStage.EVALUATING] == {RoundStage.WAITING_FOR_CLIENTS, RoundStage.DONE, RoundStage.FAILED}


def test_federated_evaluation_is_the_example_weighted_pool_of_the_clients_and_the_unsplit_model(tmp_path, tokenizer):
    # Arrange: two clients with 3 and 5 held-out examples of their own
    fed, metrics, data = _federation(tmp_path, tokenizer, {"a": 3, "b": 5})

    # Act
    result = fed.run(timeout=120)
    metrics.close()

    # Assert: one record per round (round 0: the starting parts), pooling exactly what each client computed
    records = read_metrics(tmp_path / "metrics.jsonl", "federated_eval")
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        clients, pooled = record["clients"], record["aggregate"]
        assert set(clients) == {"a", "b"} and record["missing"] == []
        for cid, runner in fed.runners.items():
            own = next(h for h in runner.evaluator.history if h["round"] == record["round"])
            assert clients[cid]["loss"] == pytest.approx(own["loss"], abs=1e-12)
        tokens = clients["a"]["tokens"] + clients["b"]["tokens"]
        assert pooled["n"] == 8 == record["num_examples"]
        assert pooled["tokens"] == tokens
        weighted = (clients["a"]["loss"] * clients["a"]["tokens"] + clients["b"]["loss"] * clients["b"]["tokens"])
        assert pooled["loss"] == pytest.approx(weighted / tokens, rel=1e-12)
        assert pooled["perplexity"] == pytest.approx(math.exp(pooled["loss"]))
    # ... round 0 is the base model (fresh LoRA adapters change nothing): the zero-shot row
    model, parts = build_model()
    with torch.no_grad():
        base = local_metrics(unsplit_access(model.eval(), tokenizer), tokenizer, data["a"] + data["b"], SETTINGS)
    assert records[0]["aggregate"]["loss"] == pytest.approx(base["loss"], abs=1e-4)
    assert records[-1]["aggregate"]["loss"] < records[0]["aggregate"]["loss"]
    # ... and the last round's numbers are what the unsplit model with the final parts gives, client by client
    load_client_adapters(parts.head, parts.tail, result.global_adapters)
    load_adapter_state_dict(parts.trunk, result.trunk_adapters)
    model.eval()
    access = unsplit_access(model, tokenizer)
    with torch.no_grad():
        central = {cid: local_metrics(access, tokenizer, data[cid], SETTINGS) for cid in data}
        union = local_metrics(access, tokenizer, data["a"] + data["b"], SETTINGS)
    last = records[-1]
    for cid in data:
        assert last["clients"][cid]["loss"] == pytest.approx(central[cid]["loss"], abs=1e-4)
    assert last["aggregate"]["loss"] == pytest.approx(union["loss"], abs=1e-4)


class LyingEvaluator(LocalEvaluator):
    """Claims impossible numbers for its held-out data."""

    def evaluate(self, head, tail, channel, cfg, round):
        return {"n": float(len(self.data)), "loss": math.nan, "tokens": 10.0}


def test_a_lying_report_is_refused_and_the_round_goes_on(tmp_path, tokenizer):
    fed, metrics, data = _federation(tmp_path, tokenizer, {"honest": 4, "liar": 4}, rounds=2)
    fed.runners["liar"].evaluator = LyingEvaluator(tokenizer, data["liar"], SETTINGS)

    result = fed.run(timeout=120)
    metrics.close()

    assert result.rounds_completed == 2
    refused = read_metrics(tmp_path / "metrics.jsonl", "eval_refused")
    assert [(r["round"], r["client"]) for r in refused] == [(0, "liar"), (1, "liar"), (2, "liar")]
    assert "finite" in refused[0]["reason"]
    for record in read_metrics(tmp_path / "metrics.jsonl", "federated_eval"):
        assert list(record["clients"]) == ["honest"] and record["missing"] == ["liar"]
        assert record["aggregate"]["n"] == 4
    assert all(r.round for r in fed.outcomes["liar"].rounds)  # the liar still trained both rounds
    assert len(fed.outcomes["liar"].rounds) == 2


def _report(examples: int, **metrics: float) -> pb.EvalReport:
    return pb.EvalReport(round=3, num_examples=examples, metrics=metrics)


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (_report(10**12, n=1e12, loss=1.0, tokens=1e12), "num_examples: expected 0..100"),
        (_report(5, n=4.0, loss=1.0, tokens=20.0), "expected num_examples = 5"),
        (_report(5, n=-5.0, loss=1.0, tokens=20.0), "whole count"),
        (_report(5, n=5.0, loss=math.nan, tokens=20.0), "finite"),
        (_report(5, n=5.0, loss=math.inf, tokens=20.0), "finite"),
        (_report(5, n=5.0, loss=-1.0, tokens=20.0), r"loss\]: expected >= 0"),
        (_report(5, n=5.0, loss=1.0, tokens=-3.0), "tokens"),
        (_report(5, n=5.0, loss=1.0, tokens=5.0 * 32 + 1), "tokens"),
        (_report(5, n=5.0, loss=1.0), "tokens"),
        (_report(5, n=5.0, accuracy=1.5), "proportion"),
        (_report(5, n=5.0, accuracy=0.2, **{"cm.0.0": 1.0, "cm.1.1": 3.0}), "confusion matrix counts 4"),
        (_report(5, n=5.0, **{"cm.0.0": -1.0, "cm.1.1": 6.0}), "whole count"),
        (_report(5, n=5.0, secret_text=1.0), "unknown metric"),
        (_report(0, loss=1.0), "no examples"),
        (pb.EvalReport(round=2, num_examples=1, metrics={"n": 1.0}), "EvalReport.round: expected 3"),
    ],
)
def test_impossible_reports_are_refused(report, message):
    with pytest.raises(ProtocolError, match=message):
        check_eval_report(report, 3, most_examples=100, max_length=32)


def test_a_possible_report_passes_and_drops_the_perplexity():
    report = _report(5, n=5.0, loss=1.5, tokens=40.0, perplexity=1e9, accuracy=0.6, **{"cm.0.0": 3.0, "cm.1.0": 2.0})

    metrics = check_eval_report(report, 3, most_examples=5, max_length=32)

    assert metrics == {"n": 5.0, "loss": 1.5, "tokens": 40.0, "accuracy": 0.6, "cm.0.0": 3.0, "cm.1.0": 2.0}


def test_the_audit_runs_each_round_in_a_federation_and_only_its_scores_reach_the_server(tmp_path):
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=2, local_steps=2, metrics=metrics)
    for runner in fed.runners.values():
        runner.audit = PrivacyAudit(samples=2)

    fed.run(timeout=120)
    metrics.close()

    logged = read_metrics(tmp_path / "metrics.jsonl", "privacy_audit")
    assert sorted((e["round"], e["client"]) for e in logged) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    for event in logged:
        own = next(h for h in fed.runners[event["client"]].audit.history if h["round"] == event["round"])
        assert event["nearest_neighbour"] == own["audit_nearest_neighbour"]
        assert 0.0 <= event["nearest_neighbour"] <= 1.0
        assert event["positions"] == own["audit_positions"] == 2 * (2 * 12) - 3 * 2  # 2 batches of 2 x 12, 3 padded


def test_a_run_ends_with_a_table_a_summary_and_a_loss_plot(tmp_path, tokenizer):
    # Arrange: an in-process federation with federated evaluation and the audit, its metrics in tmp_path
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=2, local_steps=1, metrics=metrics,
                          evaluation=FederatedEvalConfig(enabled=True, timeout_s=30.0))
    for k, runner in enumerate(fed.runners.values()):
        data = [Example.from_pair(f"Say {w}", w * (k + 1), source="t", id=f"{k}-{w}") for w in ("yes", "no", "maybe")]
        runner.evaluator = LocalEvaluator(tokenizer, data, EvalSettings(max_length=24, batch_size=2, progress=False))
        runner.audit = PrivacyAudit(samples=1)
    fed.run(timeout=120)
    metrics.close()

    # Act
    report = report_run(tmp_path, "test run", comparison={"zero-shot": {"loss": 6.0, "rouge_l": None}},
                        print_table=False)

    # Assert
    table = report["table"]
    assert table[0].split("|")[1:-1] == [" round ", " clients ", " train loss ", " held-out loss ", " examples ",
                                         " audit NN "]
    assert [row["round"] for row in report["rounds"]] == [0, 1, 2]  # round 0: the starting parts, not trained
    assert report["rounds"][0]["train_loss"] is None and report["rounds"][0]["clients"] == 2
    assert all(row["examples"] == 6 and row["heldout_loss"] > 0 for row in report["rounds"])
    assert any(line.startswith("| zero-shot") and "6.0000" in line for line in table)
    assert set(report["privacy_audit"]["clients"]) == {"a", "b"}
    assert (tmp_path / "loss.png").stat().st_size > 1000
    (summary,) = read_metrics(tmp_path / "metrics.jsonl", "summary")
    assert summary["table"] == table and summary["comparison"]["zero-shot"]["loss"] == 6.0



def test_classification_reports_pool_into_the_accuracy_and_macro_f1_of_all_examples(tmp_path, tokenizer):
    # Arrange: CB items split 3 / 4 between two clients
    import json

    from fedsplit.data.harmonize import SourceConfig
    from fedsplit.eval.choices import load_choice_examples
    from fedsplit.eval.stats import confusion_from_metrics, macro_f1

    path = tmp_path / "cb.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CB_ROWS))
    items = load_choice_examples(SourceConfig(path=str(path), task="cb"))
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1, metrics=metrics,
                          evaluation=FederatedEvalConfig(enabled=True, timeout_s=30.0))
    fed.runners["a"].evaluator = LocalEvaluator(tokenizer, items[:3], SETTINGS)
    fed.runners["b"].evaluator = LocalEvaluator(tokenizer, items[3:], SETTINGS)

    # Act
    result = fed.run(timeout=120)
    metrics.close()

    # Assert: counts add up, macro-F1 comes from the summed matrix, and all of it is the unsplit model's
    zero_shot, record = read_metrics(tmp_path / "metrics.jsonl", "federated_eval")
    assert (zero_shot["round"], record["round"]) == (0, 1)
    a, b, pooled = record["clients"]["a"], record["clients"]["b"], record["aggregate"]
    assert pooled["accuracy"] == pytest.approx((3 * a["accuracy"] + 4 * b["accuracy"]) / 7)
    assert sum(v for k, v in pooled.items() if k.startswith("cm.")) == 7
    assert pooled["macro_f1"] == pytest.approx(macro_f1(confusion_from_metrics(pooled)))
    model, parts = build_model()
    load_client_adapters(parts.head, parts.tail, result.global_adapters)
    load_adapter_state_dict(parts.trunk, result.trunk_adapters)
    with torch.no_grad():
        central = local_metrics(unsplit_access(model.eval(), tokenizer), tokenizer, items, SETTINGS)
    assert pooled["accuracy"] == central["accuracy"]
    assert pooled["macro_f1"] == pytest.approx(central["macro_f1"])


def test_without_the_baseline_the_first_evaluation_is_round_1(tmp_path, tokenizer):
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1, metrics=metrics,
                          evaluation=FederatedEvalConfig(enabled=True, timeout_s=30.0, baseline=False))
    for k, runner in enumerate(fed.runners.values()):
        runner.evaluator = LocalEvaluator(tokenizer, _held_out(2, offset=k), SETTINGS)

    fed.run(timeout=120)
    metrics.close()

    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl", "federated_eval")] == [1]
