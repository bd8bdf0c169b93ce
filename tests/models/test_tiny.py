"""Tests for fedsplit.models.tiny: every tiny architecture loads, runs, is seeded and keeps its quirks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from fedsplit.models import TINY_MODELS, ModelLoadError, load_model
from fedsplit.models.tiny import TinySpec, build_tiny_model
from fedsplit.models.tokenizer import TINY_VOCAB_SIZE


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_gives_one_logit_row_per_token(name: str) -> None:
    model, tokenizer = load_model(name)
    batch = tokenizer(["hello", "hi there"], padding=True, return_tensors="pt")

    with torch.no_grad():
        logits = model(**batch).logits

    assert logits.shape == (2, batch["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("name", TINY_MODELS)
def test_same_seed_gives_identical_weights(name: str) -> None:
    first = build_tiny_model(name, seed=7).state_dict()

    second = build_tiny_model(name, seed=7).state_dict()

    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_different_seeds_give_different_weights(name: str) -> None:
    first = build_tiny_model(name, seed=1).get_input_embeddings().weight

    second = build_tiny_model(name, seed=2).get_input_embeddings().weight

    assert not torch.equal(first, second)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)

    build_tiny_model("tiny-llama", seed=5)

    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_no_dropout_anywhere(name: str) -> None:
    model = build_tiny_model(name)

    rates = {key: value for key, value in model.config.to_dict().items() if "dropout" in key or "pdrop" in key}
    modules = [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)]

    assert rates and all(rate == 0 for rate in rates.values()), rates
    assert all(p == 0 for p in modules)


def test_tiny_qwen2_mixes_full_and_sliding_window_layers() -> None:
    model = build_tiny_model("tiny-qwen2")

    layer_types = model.config.layer_types

    assert set(layer_types) == {"full_attention", "sliding_attention"}
    assert len(layer_types) == model.config.num_hidden_layers
    assert model.config.sliding_window == 8


def _last_logits_change_when_first_token_changes(name: str) -> bool:
    model = build_tiny_model(name)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 256
    with torch.no_grad():
        before, after = model(ids).logits[0, -1], model(changed).logits[0, -1]
    return not torch.allclose(before, after, atol=1e-6)


def test_tiny_mistral_sliding_window_limits_how_far_back_a_token_sees() -> None:
    # Six layers with an 8-token window reach at most 6 * 7 = 42 tokens back, so position 63
    # cannot see token 0; with full attention (tiny-llama) it can.
    model = build_tiny_model("tiny-mistral")

    mistral_sees_token_0 = _last_logits_change_when_first_token_changes("tiny-mistral")
    llama_sees_token_0 = _last_logits_change_when_first_token_changes("tiny-llama")

    assert model.config.sliding_window == 8
    assert not mistral_sees_token_0
    assert llama_sees_token_0


def test_tiny_gpt2_ties_embeddings_and_tiny_llama_does_not() -> None:
    gpt2, llama = build_tiny_model("tiny-gpt2"), build_tiny_model("tiny-llama")

    gpt2_tied = gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight
    llama_tied = llama.get_output_embeddings().weight is llama.get_input_embeddings().weight

    assert gpt2_tied and gpt2.config.tie_word_embeddings
    assert not llama_tied and not llama.config.tie_word_embeddings


def test_unknown_tiny_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelLoadError, match="tiny-llama"):
        build_tiny_model("tiny-bert")


def test_spec_rejects_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        TinySpec(LlamaConfig, {"attention_dropout": 0.1})


def test_spec_rejects_a_class_that_is_not_a_config() -> None:
    with pytest.raises(TypeError, match="config class"):
        TinySpec(dict, {})  # type: ignore[arg-type]
