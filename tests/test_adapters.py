"""LoRA per part in the standard PEFT format; the three adapters load into the unsplit model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedsplit.adapters import (
    AdapterError,
    LoraSettings,
    adapter_parameters,
    adapter_state_dict,
    add_part_adapters,
    load_adapter,
    load_adapter_state_dict,
    merge_adapters,
    save_adapter,
    trainable_parameters,
)
from fedsplit.models import load_model
from fedsplit.split import positions_from_mask, split_model

from tiny import randomize_adapters

SETTINGS = [LoraSettings(r=4), LoraSettings(r=8, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
            LoraSettings(r=2, alpha=4)]


def _batch():
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask, positions_from_mask(mask)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_merged_part_adapters_reproduce_split_outputs_in_one_peft_model(tmp_path, name):
    model, _ = load_model(name)
    base, _ = load_model(name)
    parts = split_model(model, 2, 1)
    settings = SETTINGS if name != "tiny-gpt2" else [LoraSettings(r=4), LoraSettings(r=8), LoraSettings(r=2)]
    add_part_adapters(parts, settings, seed=0)
    randomize_adapters(parts, 0.5)
    ids, mask, pos = _batch()
    split_logits = parts.tail(parts.trunk(parts.head(ids, mask, pos), mask, pos), mask, pos)

    merge_adapters(list(parts), tmp_path / "merged", base_model=name)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "merged")
    logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    torch.testing.assert_close(logits, split_logits, atol=1e-5, rtol=0)


def test_part_adapter_is_standard_peft_format(tmp_path, tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 2, 1)
    add_part_adapters(parts, SETTINGS, seed=0)

    save_adapter(parts.trunk, tmp_path / "trunk", base_model="tiny-llama")
    config = json.loads((tmp_path / "trunk" / "adapter_config.json").read_text())

    assert (tmp_path / "trunk" / "adapter_model.safetensors").is_file()
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert "model\\.layers\\.2\\.self_attn\\.o_proj" in config["target_modules"]
    assert "layers\\.0\\." not in config["target_modules"]  # only the trunk's blocks
    keys = set(adapter_state_dict(parts.trunk))
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys


def test_part_adapter_round_trips_through_files(tmp_path, tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 2, 1)
    add_part_adapters(parts, SETTINGS, seed=0)
    randomize_adapters(parts, 0.5)
    before = adapter_state_dict(parts.head)
    save_adapter(parts.head, tmp_path / "head")
    with torch.no_grad():
        for p in trainable_parameters(parts.head):
            p.zero_()

    load_adapter(parts.head, tmp_path / "head")

    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(parts.head).items())


def test_init_is_deterministic_in_seed_and_leaves_global_rng_alone(tiny_llama):
    model_a, _ = load_model("tiny-llama")
    model_b, _ = load_model("tiny-llama")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    add_part_adapters(split_model(model_a, 1, 1), SETTINGS, seed=7)
    after = torch.rand(1)
    add_part_adapters(split_model(model_b, 1, 1), SETTINGS, seed=7)

    assert torch.equal(after, expected_next)
    a, b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)


def test_only_lora_weights_train(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, SETTINGS)

    trainable = [n for part in parts for n, p in part.named_parameters() if p.requires_grad]

    assert trainable and all("lora_" in n for n in trainable)


def test_loading_an_adapter_of_another_part_is_refused(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 2, 1)
    add_part_adapters(parts, SETTINGS)

    with pytest.raises(AdapterError, match="does not fit the tail: missing"):
        load_adapter_state_dict(parts.tail, adapter_state_dict(parts.head))


def test_wrong_shape_is_refused(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 2, 1)
    add_part_adapters(parts, SETTINGS)
    tensors = {k: torch.zeros(1) for k in adapter_state_dict(parts.head)}

    with pytest.raises(AdapterError, match="expected shape"):
        load_adapter_state_dict(parts.head, tensors)


def test_unknown_target_module_is_a_clear_error(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 2, 1)

    with pytest.raises(AdapterError, match=r"no module of the head \(blocks 0..1\) matches LoRA targets \['c_attn'\]"):
        add_part_adapters(parts, [LoraSettings(target_modules=("c_attn",))] * 3)


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}])
def test_bad_lora_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="lora"):
        LoraSettings(**kwargs)


def test_adapter_parameters_are_the_live_lora_weights_under_the_state_dict_keys(tiny_llama):
    model, _ = tiny_llama
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, SETTINGS)

    params = adapter_parameters(parts.tail)
    with torch.no_grad():
        next(iter(params.values())).add_(1.0)

    assert list(params) == list(adapter_state_dict(parts.tail))
    assert all(p.requires_grad for p in params.values())
    assert all(torch.equal(params[k], v) for k, v in adapter_state_dict(parts.tail).items())  # live, not copies
