"""``fedsplit demo`` (fedsplit.recipes.demo) with P-tuning v2: the federation's processes replaced by a
server directory holding what a prefix run saves; the zero-shot, federated and centralized legs real."""

from __future__ import annotations

import json
import warnings

import pytest

from fedsplit.config import DataConfig, EvalConfig, FederationConfig, MethodConfig, ModelConfig, RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.recipes import federated as federated_recipe
from fedsplit.recipes.demo import run_demo
from fedsplit.train.config import TrainConfig

P = 3


def tiny_config() -> RunConfig:
    """The demo on tiny-llama: 2 clients x 1 round x 1 local step (2 centralized steps), 2 held-out examples."""
    return RunConfig(
        model=ModelConfig(name="tiny-llama", head_layers=1, tail_layers=1),
        train=TrainConfig(lr=1e-2, batch_size=2, max_length=32, warmup_steps=0),
        data=DataConfig(num_clients=2, max_eval_examples=2),
        federation=FederationConfig(rounds=1, local_steps=1),
        eval=EvalConfig(rouge_examples=0),
        method=MethodConfig(name="prefix", num_virtual_tokens=P),
    )


def _stub_federation(monkeypatch):
    """``simulate`` -> a server directory with ``adapters/prefix`` (random prefixes) and one client's losses."""
    from fedsplit.models import load_model
    from fedsplit.recipes.prefix_network import save_final_prefix
    from fedsplit.split import split_model
    from fedsplit.split.prefix import add_part_prefixes

    def simulate(cfg, run_dir):
        model, _ = load_model(cfg.model.name)
        parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
        add_part_prefixes(parts, cfg.method.num_virtual_tokens, seed=11)
        server_dir = run_dir / "server"
        save_final_prefix(parts, server_dir / "adapters", cfg.model.name)
        with MetricsWriter(run_dir / "client-0" / "metrics.jsonl") as metrics:
            for step in range(2):
                metrics.write("train_step", step=step + 1, loss=5.0 - step)
        return server_dir

    monkeypatch.setattr(federated_recipe, "simulate", simulate)


def test_a_prefix_demo_reports_federated_and_centralized_held_out_losses(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    from fedsplit.models import load_model
    from fedsplit.recipes.common import load_federated_data
    from fedsplit.recipes.evaluate import evaluate

    # Arrange
    _stub_federation(monkeypatch)
    cfg = tiny_config()
    out = tmp_path / "demo"

    # Act
    code = run_demo(cfg, out)

    # Assert: both rows printed and recorded, each from its PEFT prefix adapter
    printed = capsys.readouterr().out
    assert code == 0 and f"P-tuning v2 (P = {P})" in printed
    assert "| federated split (fedavg)" in printed and "| centralized " in printed
    losses = {r["mode"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "eval")}
    assert set(losses) == {"zero-shot", "federated", "centralized"}
    centralized = json.loads((out / "adapters" / "centralized" / "adapter_config.json").read_text())
    assert centralized["peft_type"] == "PREFIX_TUNING" and centralized["num_virtual_tokens"] == P
    base, tokenizer = load_model("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        federated = PeftModel.from_pretrained(base, str(out / "federated" / "server" / "adapters" / "prefix"))
    held_out = load_federated_data(cfg.data, cfg.train.seed).eval
    assert evaluate(federated, tokenizer, held_out, cfg).loss == pytest.approx(losses["federated"], abs=1e-5)
    assert abs(losses["federated"] - losses["zero-shot"]) > 1e-3
    assert (out / "loss.png").is_file()
