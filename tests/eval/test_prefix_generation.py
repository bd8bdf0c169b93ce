"""Greedy generation of a PEFT P-tuning v2 model (fedsplit.eval.prefix_generation) equals greedy decoding
through the split parts with the same prefixes."""

from __future__ import annotations

import copy
import warnings

import torch

from fedsplit.eval.prefix_generation import generate, prefix_tokens
from fedsplit.eval.scoring import function_access, unsplit_access
from fedsplit.split import split_model
from fedsplit.split.prefix import add_part_prefixes, save_prefix_adapter

from tiny import split_logits_fn

PROMPTS = [[5, 17, 33, 90, 12, 41], [7, 8, 9]]  # left-padded together


def test_a_prefix_model_generates_what_the_split_parts_with_its_prefixes_decode(tiny_models, tmp_path):
    from peft import PeftModel

    # Arrange: split parts with random prefixes, and the same prefixes as a PEFT adapter on the unsplit model
    # (tiny-llama: tiny-qwen2's 8-token sliding window would count the left padding of the cached generate,
    # not of the right-padded greedy decoding, whatever the prefixes)
    base, tokenizer = tiny_models["tiny-llama"]
    parts = split_model(copy.deepcopy(base).float(), 1, 1)
    add_part_prefixes(parts, 3, seed=4, init_std=1.0)  # far from zero: dropped prefixes would show
    save_prefix_adapter(parts, tmp_path / "prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base).float(), str(tmp_path / "prefix")).eval()

    split_logits = split_logits_fn(parts)

    # Act
    with torch.no_grad():
        split = function_access(split_logits, tokenizer).generate(PROMPTS, 6)
        unsplit = unsplit_access(model, tokenizer).generate(PROMPTS, 6)
        plain = unsplit_access(copy.deepcopy(base).float(), tokenizer).generate(PROMPTS, 6)

    # Assert
    assert prefix_tokens(model) == 3 and prefix_tokens(base) == 0
    assert unsplit == split
    assert plain != split  # the prefixes change the answers


def test_any_other_model_goes_to_its_own_generate(tiny_models):
    base, tokenizer = tiny_models["tiny-llama"]
    ids = torch.tensor([[tokenizer.pad_token_id, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    with torch.no_grad():
        ours = generate(base, ids, mask, **settings)
        theirs = base.generate(input_ids=ids, attention_mask=mask, **settings)

    assert torch.equal(ours, theirs) and ours.shape == (2, 6)
