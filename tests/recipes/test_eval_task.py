from __future__ import annotations

import json

import pytest
import torch

from fedsplit.cli import main
from fedsplit.recipes.eval_task import find_adapter

from tiny import split_logits_fn

ROWS = [
    {"premise": "The cat sat on the mat.", "hypothesis": "A cat sat.", "label": "entailment"},
    {"premise": "It rained all day.", "hypothesis": "It was sunny.", "label": "contradiction"},
    {"premise": "She may come later.", "hypothesis": "She will come.", "label": "neutral"},
    {"premise": "Dogs bark.", "hypothesis": "Dogs make sounds.", "label": "entailment"},
]


@pytest.fixture
def cb_file(tmp_path):
    path = tmp_path / "cb.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _merged_run(tmp_path, model_name: str = "tiny-llama"):
    """A run directory like `fedsplit server` leaves: adapters/merged, with non-zero LoRA weights."""
    from fedsplit.adapters import LoraSettings, add_part_adapters, merge_adapters
    from fedsplit.models import load_model
    from fedsplit.split import split_model

    model, _ = load_model(model_name)
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, [LoraSettings(r=4)] * 3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    merge_adapters(list(parts), tmp_path / "run" / "adapters" / "merged", base_model=model_name)
    return tmp_path / "run"


def test_eval_zero_shot_writes_json_with_intervals(cb_file, tmp_path, capsys) -> None:
    out = tmp_path / "eval.json"

    code = main(["eval", "--task", "cb", "--data", str(cb_file), "--model", "tiny-llama", "--limit", "3",
                 "--json", str(out), "--max-length", "64"])

    record = json.loads(out.read_text())
    assert code == 0
    assert record["n"] == 3 and record["kind"] == "classification"
    m = record["metrics"]
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    assert {"macro_f1", "exact_match", "accuracy_norm"} <= set(m)
    assert "| accuracy |" in capsys.readouterr().out


def test_eval_of_a_run_directory_loads_its_merged_adapter(cb_file, tmp_path) -> None:
    run = _merged_run(tmp_path)
    zero, tuned = tmp_path / "zero.json", tmp_path / "tuned.json"

    assert main(["eval", "--task", "cb", "--data", str(cb_file), "--model", "tiny-llama", "--json", str(zero),
                 "--no-exact-match"]) == 0
    assert main(["eval", "--task", "cb", "--data", str(cb_file), "--run", str(run), "--json", str(tuned),
                 "--no-exact-match"]) == 0

    zero_ll = [ll for s in json.loads(zero.read_text())["samples"] for ll in s["loglik"]]
    tuned_record = json.loads(tuned.read_text())
    tuned_ll = [ll for s in tuned_record["samples"] for ll in s["loglik"]]
    assert "adapters/merged" in tuned_record["model"] and tuned_record["model"].startswith("tiny-llama")
    assert max(abs(a - b) for a, b in zip(tuned_ll, zero_ll, strict=True)) > 0.1


def test_eval_generation_task_with_a_user_mapping(tmp_path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"q": f"Repeat {w}", "a": w}) + "\n" for w in ("alpha", "beta")))
    out = tmp_path / "gen.json"

    code = main(["eval", "--data", str(path), "--prompt-template", "{q}", "--response-field", "a",
                 "--model", "tiny-llama", "--max-new-tokens", "4", "--json", str(out)])

    m = json.loads(out.read_text())["metrics"]
    assert code == 0 and {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeL_ci_high"} <= set(m)


def test_find_adapter_names_the_expected_places_and_refuses_to_guess(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="adapters/merged"):
        find_adapter(tmp_path)
    for place in ("adapters/centralized", "federated/server/adapters/merged"):  # a demo run directory
        (tmp_path / place).mkdir(parents=True)
        (tmp_path / place / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="several adapters"):
        find_adapter(tmp_path)
    assert find_adapter(tmp_path / "adapters" / "centralized") == tmp_path / "adapters" / "centralized"


def test_eval_needs_a_task_or_a_mapping(cb_file, capsys) -> None:
    code = main(["eval", "--data", str(cb_file), "--model", "tiny-llama"])

    assert code == 2 and "expected --task" in capsys.readouterr().err


def test_eval_on_the_builtin_stdlib_docs_held_out_set(tmp_path) -> None:
    out = tmp_path / "docs.json"

    code = main(["eval", "--data", "stdlib-docs", "--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "3",
                 "--max-length", "64", "--json", str(out)])

    record = json.loads(out.read_text())
    assert code == 0 and record["task"] == "stdlib-docs" and record["n"] == 2 and "rougeL" in record["metrics"]


def _prefix_run(tmp_path):
    """A run directory like a prefix `fedsplit server` leaves (adapters/prefix), and its parts."""
    from fedsplit.models import load_model
    from fedsplit.recipes.prefix_network import save_final_prefix
    from fedsplit.split import split_model
    from fedsplit.split.prefix import add_part_prefixes

    model, tokenizer = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, 3, seed=4, init_std=1.0)  # N(0, 1), as if trained: far from the base model's output
    save_final_prefix(parts, tmp_path / "run" / "adapters", "tiny-llama")
    return tmp_path / "run", parts, tokenizer


def test_eval_of_a_prefix_run_gives_the_loss_of_the_split_parts_with_their_prefixes(tmp_path) -> None:
    # Arrange: a generation task, and the reference loss measured through head -> trunk -> tail
    from fedsplit.data import SourceConfig, load_examples
    from fedsplit.eval.evaluator import EvalSettings, evaluate_generation
    from fedsplit.eval.scoring import function_access

    run, parts, tokenizer = _prefix_run(tmp_path)
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"q": f"Repeat {w} twice", "a": f"{w} {w}"}) + "\n"
                            for w in ("alpha", "beta", "gamma")))
    source = SourceConfig(path=str(path), prompt_template="{q}", response_field="a")

    split_logits = split_logits_fn(parts)

    settings = EvalSettings(max_new_tokens=2, progress=False)
    with torch.no_grad():
        split = evaluate_generation(function_access(split_logits, tokenizer), tokenizer, load_examples(source),
                                    settings).metrics
    tuned, zero = tmp_path / "tuned.json", tmp_path / "zero.json"
    args = ["eval", "--data", str(path), "--prompt-template", "{q}", "--response-field", "a", "--max-new-tokens", "2"]

    # Act
    assert main([*args, "--run", str(run), "--json", str(tuned)]) == 0
    assert main([*args, "--model", "tiny-llama", "--json", str(zero)]) == 0

    # Assert: the PEFT prefix adapter on the unsplit model scores what the split parts do
    record = json.loads(tuned.read_text())
    assert "adapters/prefix" in record["model"] and "prefix tuning" in record["model"]
    assert record["metrics"]["tokens"] == split["tokens"]
    assert record["metrics"]["loss"] == pytest.approx(split["loss"], abs=1e-5)
    assert abs(record["metrics"]["loss"] - json.loads(zero.read_text())["metrics"]["loss"]) > 0.01


def test_a_run_directory_without_an_adapter_names_both_kinds_looked_for(tmp_path) -> None:
    (tmp_path / "adapters" / "head").mkdir(parents=True)  # per-part adapters only: not an evaluable model

    with pytest.raises(FileNotFoundError, match="no merged LoRA adapter and no prefix adapter") as info:
        find_adapter(tmp_path)
    assert "adapters/merged" in str(info.value) and "adapters/prefix" in str(info.value)


def test_find_adapter_finds_the_prefix_adapter_of_server_simulate_and_demo_directories(tmp_path) -> None:
    for place in ("adapters/prefix", "server/adapters/prefix", "federated/server/adapters/prefix"):
        run = tmp_path / place.replace("/", "-")
        (run / place).mkdir(parents=True)
        (run / place / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')

        assert find_adapter(run) == run / place
