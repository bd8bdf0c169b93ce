from __future__ import annotations

import pytest
import torch

from fedsplit.models import TINY_MODELS
from fedsplit.split import SplitError, UnsupportedArchitectureError, split_model
from fedsplit.split.check import check_logits_and_grads

CUTS = [(1, 1), (2, 3), (4, 1)]


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"p{c[0]}q{c[1]}")
def test_split_logits_and_every_gradient_match_unsplit(tiny_models, name, cut):
    model, _ = tiny_models[name]

    logits, grads = check_logits_and_grads(model, *cut)

    assert logits <= 1e-5
    assert grads <= 1e-5


def test_parts_keep_unsplit_module_names(tiny_llama):
    model, _ = tiny_llama
    head, trunk, tail = split_model(model, head_layers=2, tail_layers=1)
    unsplit = set(dict(model.named_parameters()))

    names = [set(dict(part.named_parameters())) for part in (head, trunk, tail)]

    assert all(n <= unsplit for n in names)
    assert "model.embed_tokens.weight" in names[0] and "model.layers.1.mlp.up_proj.weight" in names[0]
    assert {n.split(".")[2] for n in names[1]} == {"2", "3", "4"}
    assert "lm_head.weight" in names[2] and "model.norm.weight" in names[2]
    assert not any(n.startswith("model.embed_tokens") for n in names[1] | names[2])


def test_trunk_holds_no_embedding_or_head(tiny_llama):
    model, _ = tiny_llama
    _, trunk, _ = split_model(model, 1, 1)

    kinds = {type(m).__name__ for m in trunk.modules()}

    assert "Embedding" not in kinds
    assert len(list(trunk.parameters())) > 0


@pytest.mark.parametrize("p,q", [(0, 1), (1, 0), (3, 3), (5, 1), (-1, 2)])
def test_impossible_cut_is_refused_with_clear_error(tiny_llama, p, q):
    model, _ = tiny_llama  # 6 blocks

    with pytest.raises(SplitError, match=r"(>= 1|< the model's 6 blocks)"):
        split_model(model, p, q)


def test_unknown_architecture_names_supported_ones(tiny_llama):
    model, _ = tiny_llama
    model.config.model_type = "bert"

    with pytest.raises(UnsupportedArchitectureError, match="supported architectures are .*llama"):
        split_model(model, 1, 1)


def test_head_output_depends_only_on_real_tokens_with_left_padding(tiny_llama):
    model, _ = tiny_llama
    head, _, _ = split_model(model, 2, 1)
    ids = torch.randint(0, 250, (1, 8))
    padded = torch.cat([torch.full((1, 3), 0), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    from fedsplit.split import positions_from_mask

    plain = head(ids, torch.ones(1, 8, dtype=torch.long), positions_from_mask(torch.ones(1, 8)))
    left = head(padded, mask, positions_from_mask(mask))

    torch.testing.assert_close(left[:, 3:], plain, atol=1e-5, rtol=0)
