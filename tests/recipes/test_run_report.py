"""The end of a network run (issue 12, items 1 and 4): evaluation and audit built from the
configuration, the rounds' table, the summary event and the loss plot; ``fedsplit simulate``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedsplit.attacks.inversion import RidgeInverter
from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.recipes.common import load_federated_data
from fedsplit.recipes.run_report import (
    audit_summary,
    client_audit,
    client_evaluator,
    client_held_out,
    federated_eval_config,
    round_table,
)


def test_each_client_evaluates_its_own_share_of_the_held_out_set():
    cfg = RunConfig()
    held_out = load_federated_data(cfg.data, cfg.train.seed).eval

    shares = [client_held_out(replace(cfg, client=replace(cfg.client, silo=k))) for k in range(cfg.data.num_clients)]

    ids = [example.id for share in shares for example in share]
    assert len(ids) == len(set(ids)) == len(held_out)  # disjoint, and together the whole held-out set
    assert sorted(ids) == sorted(example.id for example in held_out)


def test_evaluation_and_audit_follow_the_configuration(tmp_path):
    cfg = RunConfig()
    off = replace(cfg, eval=replace(cfg.eval, federated=False))
    inverter = tmp_path / "inverter.safetensors"
    RidgeInverter(torch.zeros(9, 8), torch.eye(8)).save(inverter)
    audited = replace(cfg, privacy=replace(cfg.privacy, audit=True, audit_samples=2, hidden_noise_std=0.5,
                                           audit_inverter=str(inverter)))

    assert client_evaluator(off, tokenizer=None) is None and client_audit(cfg) is None
    assert federated_eval_config(off).enabled is False
    server = federated_eval_config(cfg)
    assert server.enabled and server.max_examples == cfg.data.max_eval_examples
    assert server.baseline and not federated_eval_config(replace(cfg, eval=replace(cfg.eval,
                                                                 federated_zero_shot=False))).baseline
    assert server.max_length == cfg.train.max_length
    audit = client_audit(audited)
    assert (audit.samples, audit.noise_std) == (2, 0.5) and isinstance(audit.inverter, RidgeInverter)


def test_the_audit_summary_gives_mean_and_worst_per_client():
    records = [{"round": 1, "client": "a", "nearest_neighbour": 0.2},
               {"round": 2, "client": "a", "nearest_neighbour": 0.4},
               {"round": 1, "client": "b", "nearest_neighbour": 0.9, "learned": 0.5}]

    summary = audit_summary(records)

    assert summary["nearest_neighbour_mean"] == pytest.approx(0.5) and summary["nearest_neighbour_max"] == 0.9
    assert summary["clients"]["a"]["nearest_neighbour"] == {"mean": pytest.approx(0.3), "max": 0.4}
    assert summary["learned_mean"] == 0.5 and "learned" not in summary["clients"]["a"]


@pytest.mark.slow
def test_simulate_ends_with_the_report(tmp_path, capsys):
    """One round, one client, tiny model: four processes' start-up dominates (about a minute here)."""
    from fedsplit.cli import main

    flags = ["--set", "model.name=tiny-llama", "--set", "train.batch_size=4", "--set", "train.max_length=32",
             "--set", "federation.rounds=1", "--set", "federation.local_steps=1", "--set", "data.num_clients=1",
             "--set", "data.max_eval_examples=8", "--set", "eval.rouge_examples=0", "--set", "privacy.audit=true",
             "--set", "server.threads=1", "--set", "client.threads=1", "--set", "server.join_grace_s=0"]

    assert main(["simulate", "--out", str(tmp_path), *flags]) == 0

    out = capsys.readouterr().out
    assert "| zero-shot" in out and "| federated split (final)" in out and "audit NN" in out
    (summary,) = read_metrics(tmp_path / "metrics.jsonl", "summary")
    zero_shot, row = summary["rounds"]
    assert zero_shot["examples"] == row["examples"] == 8
    # the federated evaluation through the split equals the held-out loss scored centrally: of the base
    # model at round 0, of the merged adapter after the last round
    assert zero_shot["heldout_loss"] == pytest.approx(summary["comparison"]["zero-shot"]["loss"], abs=1e-4)
    assert row["heldout_loss"] == pytest.approx(summary["comparison"]["federated split (final)"]["loss"], abs=1e-4)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "server" / "loss.png").is_file()


def test_the_round_table_reads_runs_with_and_without_federated_evaluation(tmp_path):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    for run_dir, evals in ((plain, []), (evaluated, [0, 1])):
        run_dir.mkdir()
        with MetricsWriter(run_dir / "metrics.jsonl") as metrics:
            for number in evals[:1]:  # round 0: the starting parts, before any round_end
                metrics.write("federated_eval", round=number, clients={"a": {}}, aggregate={"loss": 3.0, "n": 4})
            metrics.write("round_end", round=1, clients=["a", "b"], metrics={"loss": 2.5})
            for number in evals[1:]:
                metrics.write("federated_eval", round=number, clients={"a": {}, "b": {}},
                              aggregate={"loss": 2.0, "n": 8})

    _, without = round_table(plain)
    _, with_eval = round_table(evaluated)

    assert [(r["round"], r["clients"], r["train_loss"], r["heldout_loss"]) for r in without["rounds"]] == [
        (1, 2, 2.5, None)]
    assert [(r["round"], r["clients"], r["train_loss"], r["heldout_loss"]) for r in with_eval["rounds"]] == [
        (0, 1, None, 3.0), (1, 2, 2.5, 2.0)]
