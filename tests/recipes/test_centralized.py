"""``fedsplit centralized`` (fedsplit.recipes.centralized) with LoRA and with P-tuning v2 prefixes, tiny-llama."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from fedsplit.config import DataConfig, EvalConfig, FederationConfig, MethodConfig, ModelConfig, RunConfig
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.recipes.centralized import prefix_model, run_centralized
from fedsplit.train.config import TrainConfig

P = 3


def tiny_config(method: str = "prefix") -> RunConfig:
    """2 clients x 1 round x 1 local step: 2 centralized steps on tiny-llama, 2 held-out examples."""
    return RunConfig(
        model=ModelConfig(name="tiny-llama", head_layers=1, tail_layers=1),
        train=TrainConfig(lr=1e-2, batch_size=2, max_length=32, warmup_steps=0),
        data=DataConfig(num_clients=2, max_eval_examples=2),
        federation=FederationConfig(rounds=1, local_steps=1),
        eval=EvalConfig(rouge_examples=1, max_new_tokens=3),
        method=MethodConfig(name=method, num_virtual_tokens=P),
    )


@pytest.fixture(scope="module")
def data():
    from fedsplit.recipes.common import load_federated_data

    return load_federated_data(tiny_config().data, 0)


def test_the_centralized_prefix_model_starts_from_the_prefixes_a_federation_starts_from():
    from fedsplit.models import load_model
    from fedsplit.recipes.prefix_network import build_prefix_parts
    from fedsplit.split import split_model
    from fedsplit.split.prefix import peft_prefix_table

    cfg = tiny_config()
    cfg = replace(cfg, method=replace(cfg.method, init_std=0.5))  # not the default: both sides must read it
    model, _ = load_model("tiny-llama")
    _, server = build_prefix_parts(cfg, "server")  # the server's trunk and global head/tail prefixes

    peft_model, table = prefix_model(model, split_model(model, 1, 1), P, seed=cfg.train.seed,
                                     init_std=cfg.method.init_std)

    assert torch.equal(table.detach(), peft_prefix_table(list(server)))
    assert 0.45 < table.std().item() < 0.55
    assert [p for p in peft_model.parameters() if p.requires_grad] == [table]


def test_centralized_prefix_tuning_saves_a_peft_prefix_adapter_that_scores_its_held_out_loss(data, tmp_path):
    from peft import PeftModel

    from fedsplit.models import load_model
    from fedsplit.recipes.evaluate import evaluate

    # Arrange
    cfg = tiny_config()

    # Act
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        result = run_centralized(cfg, data, tmp_path, metrics)

    # Assert: one PEFT prefix adapter, where the LoRA baseline leaves its merged adapter
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert result.adapter_dir == tmp_path / "adapters" / "centralized"
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert len(result.losses) == 2 and result.eval.rouge_l is not None
    assert [r["mode"] for r in read_metrics(tmp_path / "metrics.jsonl", "eval")] == ["centralized"]
    base, tokenizer = load_model("tiny-llama")
    zero = evaluate(base, tokenizer, data.eval, cfg).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert evaluate(loaded, tokenizer, data.eval, cfg).loss == pytest.approx(result.eval.loss, abs=1e-5)
    assert abs(result.eval.loss - zero) > 1e-3


def test_centralized_lora_still_saves_a_merged_lora_adapter(data, tmp_path):
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        result = run_centralized(tiny_config("lora"), data, tmp_path, metrics)

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(result.losses) == 2
