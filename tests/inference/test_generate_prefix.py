"""Split generation with P-tuning v2 prefixes equals PEFT's prefix-tuning ``generate`` on the unsplit model."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from peft import PeftModel

from fedsplit.inference import GenerationError, LocalTrunk, SamplingSettings, generate_ids, iter_tokens
from fedsplit.models import load_model
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask
from fedsplit.split.prefix import add_part_prefixes, save_prefix_adapter

P = 3
NEW = 24  # > the tiny models' sliding window of 8, with the prefix inside it at first


def prefixed_parts(name: str, tmp_path, head: int = 2, tail: int = 1):
    """A model cut with random prefixes on every part, and the base + their PEFT prefix adapter."""
    model, tokenizer = load_model(name)
    base, _ = load_model(name)
    parts = split_model(model, head, tail)
    add_part_prefixes(parts, P, seed=4, init_std=1.0)  # N(0, 1), as PEFT initializes them: far from zero
    save_prefix_adapter(list(parts), tmp_path / "prefix", base_model=name)
    unsplit = PeftModel.from_pretrained(base, str(tmp_path / "prefix")).eval()
    return parts, unsplit, tokenizer


def peft_generate(unsplit, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    """``PeftModel.generate`` (greedy) with its prefix cache handed to the model.

    peft 0.21 injects the prefixes as ``past_key_values`` while transformers 5.2x's ``generate`` passes
    its own (empty) cache as ``cache``; the model keeps ``cache`` and drops the prefixes (it generates
    as if untuned, positions offset by P). This moves PEFT's prefilled cache to ``cache`` at the prefill,
    nothing else: the rest is PEFT's own prefix-tuning generation (mask of P leading ones, positions + P).
    """
    prepare = unsplit.prepare_inputs_for_generation

    @functools.wraps(prepare)  # generate checks the model kwargs against this signature
    def handing_over(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        injected = inputs.pop("past_key_values", None)
        cache = inputs.get("cache")
        if injected is not None and cache is not None and cache.get_seq_length() == 0:
            inputs["cache"] = injected
        return inputs

    unsplit.prepare_inputs_for_generation = handing_over
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = unsplit.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                   pad_token_id=0)
    finally:
        unsplit.prepare_inputs_for_generation = prepare
    return out[:, ids.shape[1]:].tolist()


def peft_rerun(unsplit, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    """Greedy tokens from PEFT's prefix-tuning forward over the whole sequence at every step (no cache at all)."""
    tokens = []
    for _ in range(new):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = unsplit(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        token = logits[:, -1].argmax(-1)  # (B,)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1).tolist()


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (batch, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0  # left padding, as generate expects
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_greedy_tokens_equal_peft_prefix_tuning_generate(tmp_path, name):
    parts, unsplit, _ = prefixed_parts(name, tmp_path)

    for batch in (1, 2):  # one prompt, and a left-padded batch of two
        ids, mask = prompts(batch)
        result = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, mask,
                              SamplingSettings(max_new_tokens=NEW))

        assert result.tokens == peft_generate(unsplit, ids, mask, NEW)
        assert result.tokens == peft_rerun(unsplit, ids, mask, NEW)


def test_the_prefixes_change_the_tokens(tmp_path):
    parts, unsplit, _ = prefixed_parts("tiny-llama", tmp_path)
    ids, mask = prompts(1)
    settings = SamplingSettings(max_new_tokens=NEW)
    prefixed = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, mask, settings).tokens

    with unsplit.disable_adapter(), torch.no_grad():
        plain = unsplit.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)[:, ids.shape[1]:].tolist()

    assert prefixed != plain


def test_each_cache_holds_the_prefix_before_the_prompt(tmp_path):
    parts, _, _ = prefixed_parts("tiny-llama", tmp_path)
    trunk = LocalTrunk(parts.trunk)
    ids, mask = prompts(2)
    steps = iter_tokens(parts.head, parts.tail, trunk, ids, mask, SamplingSettings(max_new_tokens=4))

    next(steps)
    next(steps)  # one decoding step after the prefill

    assert trunk.state is not None and trunk.state.length == P + 11 + 1
    assert trunk.state.mask is not None and trunk.state.mask[:, :P].all()
    assert trunk.state.mask[1, P:P + 4].logical_not().all()  # row 1's padding, after its prefix
    layer = parts.trunk.start
    assert tuple(trunk.state.cache.layers[layer].keys.shape[-2:-1]) == (P + 12,)
    steps.close()


def test_the_prefix_positions_count_in_the_context(tmp_path):
    parts, _, _ = prefixed_parts("tiny-llama", tmp_path)  # 256 positions
    trunk = LocalTrunk(parts.trunk)

    with pytest.raises(GenerationError, match=r"the prompt has 253 tokens \(\+ 3 prefix positions\); the model's "
                                              "context is 256"):
        generate_ids(parts.head, parts.tail, trunk, torch.full((1, 253), 5), None, SamplingSettings())
    result = generate_ids(parts.head, parts.tail, trunk, torch.full((1, 250), 5), None,
                          SamplingSettings(max_new_tokens=20))

    assert len(result.tokens[0]) == 256 - 250 - P and result.stop_reasons == ["context"]


def test_the_cacheless_baseline_runs_prefixed_parts_to_the_same_tokens(tmp_path):
    from fedsplit.inference.baseline import rerun_generate

    parts, _, _ = prefixed_parts("tiny-qwen2", tmp_path)
    ids, _ = prompts(1)
    settings = SamplingSettings(max_new_tokens=10)

    rerun = rerun_generate(parts.head, parts.tail, parts.trunk, ids, settings)

    assert rerun == generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None, settings).tokens[0]
    assert len(rerun_generate(parts.head, parts.tail, parts.trunk, torch.full((1, 250), 5), settings)) == 256 - 250 - P
