from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fedsplit.config import MethodConfig
from fedsplit.split import split_model
from fedsplit.split.check import check_batch, vocab_size
from fedsplit.split.parts import positions_from_mask
from fedsplit.split.prefix import (
    PrefixError,
    add_part_prefixes,
    load_peft_prefix_table,
    part_prefix,
    peft_prefix_config,
    peft_prefix_table,
)

P = 3


def _peft(model: torch.nn.Module, tokens: int = P):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, peft_prefix_config(tokens))


def _table(peft_model) -> torch.nn.Parameter:
    return peft_model.prompt_encoder["default"].embedding.weight  # (P, layers * 2 * kv_heads * head_dim)


def _batch(model, side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    return check_batch(vocab_size(model), side, torch.Generator().manual_seed(seed), seq=10)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_split_prefix_forward_backward_equals_peft_prefix_tuning(tiny_models, name):
    model = copy.deepcopy(tiny_models[name][0]).float()
    peft_model = _peft(model)
    parts = split_model(peft_model.get_base_model(), 2, 1)
    add_part_prefixes(parts, P, seed=5)
    with torch.no_grad():
        _table(peft_model).copy_(peft_prefix_table(parts))  # the same starting prefixes on both sides
    batch = _batch(model)
    mask, ids = batch["attention_mask"], batch["input_ids"]
    positions = positions_from_mask(mask)
    weights = torch.randn(*ids.shape, vocab_size(model), generator=torch.Generator().manual_seed(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT passes the deprecated past_key_values name
        reference = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    (reference * weights).sum().backward()
    hidden = parts.head(ids, mask, positions)
    hidden = parts.trunk(hidden, mask, positions)
    logits = parts.tail(hidden, mask, positions)
    (logits * weights).sum().backward()

    keep = mask.bool()
    assert (logits - reference)[keep].abs().max().item() <= 1e-5
    grads = peft_prefix_table(parts, grad=True)
    assert grads.abs().max().item() > 0
    assert (grads - _table(peft_model).grad).abs().max().item() <= 1e-5


def test_prefixes_change_the_output_and_live_on_their_parts(tiny_models):
    model = copy.deepcopy(tiny_models["tiny-llama"][0]).float()
    batch = _batch(model, "right")
    mask, positions = batch["attention_mask"], positions_from_mask(batch["attention_mask"])
    parts = split_model(model, 1, 1)
    plain = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions), mask, positions)

    add_part_prefixes(parts, P, seed=0)
    prefixed = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions),
                          mask, positions)

    assert (plain - prefixed).abs().max().item() > 1e-3
    for part in parts:
        names = [n for n, p in part.named_parameters() if p.requires_grad]
        expected = {f"prefix_tuning.{kind}.{layer}" for kind in ("key", "value") for layer in part.layer_indices}
        assert set(names) == expected
    prefix = part_prefix(parts.trunk)
    assert prefix is not None
    assert tuple(prefix.key["1"].shape) == (model.config.num_key_value_heads, P, model.config.head_dim)


def test_peft_table_round_trips_and_rejects_a_wrong_shape(tiny_models):
    model = copy.deepcopy(tiny_models["tiny-llama"][0])
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, P, seed=0)
    table = torch.randn_like(peft_prefix_table(parts))

    load_peft_prefix_table(parts, table)

    assert torch.equal(peft_prefix_table(parts), table)
    with pytest.raises(PrefixError, match="expected shape"):
        load_peft_prefix_table(parts, table[:, 1:])


def test_absolute_position_models_are_refused(tiny_models):
    parts = split_model(copy.deepcopy(tiny_models["tiny-gpt2"][0]), 1, 1)

    with pytest.raises(PrefixError, match="rotary"):
        add_part_prefixes(parts, P)


def test_method_config_validates():
    assert MethodConfig().prefix_tokens == 0
    assert MethodConfig(name="prefix", num_virtual_tokens=4).prefix_tokens == 4
    with pytest.raises(ValueError, match="method.name"):
        MethodConfig(name="adapter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        MethodConfig(name="prefix", num_virtual_tokens=0)
