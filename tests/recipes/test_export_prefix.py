"""``fedsplit export`` of a P-tuning v2 run (fedsplit.recipes.export_prefix): the PEFT adapter only."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fedsplit.models import load_model
from fedsplit.recipes.export import ExportError, ExportJob, run_export
from fedsplit.recipes.prefix_network import save_final_prefix
from fedsplit.split import positions_from_mask, split_model
from fedsplit.split.prefix import add_part_prefixes


@pytest.fixture
def prefix_run(tmp_path):
    """A server run directory of a prefix run on tiny-llama (cut 1 | 4 | 1), and its parts."""
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, 3, seed=5, init_std=1.0)  # far from zero, as trained prefixes can be
    save_final_prefix(parts, tmp_path / "run" / "adapters", "tiny-llama")
    return tmp_path / "run", parts


def test_export_of_a_prefix_run_without_adapter_only_says_why_and_what_to_pass(prefix_run, tmp_path):
    run, _ = prefix_run

    with pytest.raises(ExportError, match="cannot be merged.*pass --adapter-only"):
        run_export(ExportJob(out=tmp_path / "out", run=run))
    assert not (tmp_path / "out").exists()


def test_adapter_only_export_of_a_prefix_run_loads_with_peft_and_gives_the_split_logits(prefix_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Arrange
    run, parts = prefix_run
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    positions = positions_from_mask(mask)
    with torch.no_grad():
        split = parts.tail(parts.trunk(parts.head(ids, mask, positions), mask, positions), mask, positions)

    # Act
    out = run_export(ExportJob(out=tmp_path / "out", run=run, adapter_only=True))

    # Assert: plain transformers + peft, the base read from where the adapter says
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["base_model_name_or_path"] == str((out / "base").resolve())
    assert AutoTokenizer.from_pretrained(out).get_vocab()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        loaded = PeftModel.from_pretrained(base, str(out))
        with torch.no_grad():
            unsplit = loaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (split - unsplit)[mask.bool()].abs().max().item() <= 1e-5
