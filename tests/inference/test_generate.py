"""Split generation with per-part KV caches equals the unsplit model's ``generate`` (same adapters)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedsplit.adapters import LoraSettings, add_part_adapters, merge_adapters
from fedsplit.inference import (
    GenerationError,
    LocalTrunk,
    SamplingSettings,
    SplitGenerator,
    encode_prompt,
    generate_ids,
    iter_tokens,
)
from fedsplit.models import TINY_MODELS, load_model
from fedsplit.split import split_model

from tiny import randomize_adapters

NEW = 24  # > the tiny models' sliding window of 8: the window is exercised while decoding


def adapted_parts(name: str, tmp_path, head: int = 2, tail: int = 1):
    """A model cut with random (non-zero) LoRA on every part, and the base + merged adapter as one PEFT model."""
    model, tokenizer = load_model(name)
    base, _ = load_model(name)
    parts = split_model(model, head, tail)
    targets = ("c_attn",) if name == "tiny-gpt2" else ("q_proj", "v_proj")
    add_part_adapters(parts, [LoraSettings(r=4, target_modules=targets)] * 3, seed=0)
    randomize_adapters(parts, 0.3)
    merge_adapters(list(parts), tmp_path / "merged", base_model=name)
    unsplit = PeftModel.from_pretrained(base, str(tmp_path / "merged")).eval()
    return parts, unsplit, tokenizer


def reference(unsplit, ids, mask, new, eos=None):
    out = unsplit.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_tokens_equal_unsplit_generate_with_merged_adapters(tmp_path, name):
    parts, unsplit, _ = adapted_parts(name, tmp_path)
    ids = torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(1))

    result = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None,
                          SamplingSettings(max_new_tokens=NEW))

    expected = reference(unsplit, ids, torch.ones_like(ids), NEW)
    assert result.tokens == [expected[0].tolist()]
    assert result.stop_reasons == ["length"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_left_padded_batch_equals_unsplit_generate(tmp_path, name):
    parts, unsplit, _ = adapted_parts(name, tmp_path, head=1, tail=2)
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate expects
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)

    result = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, mask,
                          SamplingSettings(max_new_tokens=12))

    expected = reference(unsplit, ids, mask, 12)
    assert result.tokens == expected.tolist()
    assert result.prompt_lengths == [10, 6, 9]


def test_eos_ends_a_row_early_like_unsplit_generate(tmp_path):
    parts, unsplit, _ = adapted_parts("tiny-llama", tmp_path)
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(1))
    free = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None,
                        SamplingSettings(max_new_tokens=10)).tokens[0]
    eos = free[4]  # pretend the fifth generated token is the end of sequence

    result = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None,
                          SamplingSettings(max_new_tokens=10), eos_token_ids=(eos,))

    assert result.tokens[0] == free[: free.index(eos)]
    assert result.stop_reasons == ["eos"]
    assert reference(unsplit, ids, torch.ones_like(ids), 10, eos=eos)[0].tolist()[: len(result.tokens[0]) + 1] == \
        free[: free.index(eos) + 1]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tmp_path):
    parts, _, _ = adapted_parts("tiny-llama", tmp_path)
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(1))
    hot = SamplingSettings(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, seed=7)

    def run(settings):
        return generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None, settings).tokens[0]

    first, second = run(hot), run(hot)

    assert first == second
    assert first != run(SamplingSettings(max_new_tokens=16))


def test_closing_the_iteration_early_ends_the_trunk_request(tmp_path):
    parts, _, _ = adapted_parts("tiny-llama", tmp_path)
    trunk = LocalTrunk(parts.trunk)
    steps = iter_tokens(parts.head, parts.tail, trunk, torch.tensor([[5, 6, 7]]), None,
                        SamplingSettings(max_new_tokens=8))

    next(steps)
    assert trunk.state is not None and trunk.state.length == 3
    steps.close()

    assert trunk.state is None


def test_prompt_filling_the_context_is_refused_and_long_requests_are_cut_at_the_context(tmp_path):
    parts, _, _ = adapted_parts("tiny-llama", tmp_path)  # 256 positions
    trunk = LocalTrunk(parts.trunk)

    with pytest.raises(GenerationError, match="the prompt has 256 tokens; the model's context is 256"):
        generate_ids(parts.head, parts.tail, trunk, torch.full((1, 256), 5), None, SamplingSettings())
    result = generate_ids(parts.head, parts.tail, trunk, torch.full((1, 250), 5), None,
                          SamplingSettings(max_new_tokens=20))

    assert len(result.tokens[0]) == 6 and result.stop_reasons == ["context"]


def test_the_chat_template_frames_the_prompt_and_the_stream_joins_to_the_greedy_text(tmp_path):
    parts, unsplit, tokenizer = adapted_parts("tiny-llama", tmp_path)
    generator = SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer, eos_token_ids=())
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([list(prompt_ids)])

    text = "".join(generator.stream("hi there", SamplingSettings(max_new_tokens=12)))

    expected = reference(unsplit, ids, torch.ones_like(ids), 12)[0].tolist()
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture(scope="module")
def stories():
    from fedsplit.models.errors import ModelLoadError

    try:
        model, tokenizer = load_model("stories260k")
    except ModelLoadError as exc:
        pytest.skip(f"stories260k not available: {exc}")
    return split_model(model, 1, 1), tokenizer


def test_streaming_yields_words_as_they_come_and_a_stop_string_ends_it_unshown(stories):
    parts, tokenizer = stories
    generator = SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer)
    pieces = list(generator.stream("Once upon a time", SamplingSettings(max_new_tokens=30)))
    full = "".join(pieces)
    stop = full.split()[4]  # the fifth word

    cut = generator.generate("Once upon a time", SamplingSettings(max_new_tokens=30, stop=(stop, "#never#")))

    assert len(pieces) > 10
    assert cut == full[: full.index(stop)]


@pytest.mark.slow
def test_smollm2_greedy_answer_equals_unsplit_generate_with_merged_adapters(tmp_path):
    from fedsplit.models.errors import ModelLoadError

    try:
        model, tokenizer = load_model("smollm2-135m")
        base, _ = load_model("smollm2-135m")
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 not in the local cache: {exc}")
    parts = split_model(model, 2, 2)
    add_part_adapters(parts, [LoraSettings(r=4)] * 3, seed=0)
    randomize_adapters(parts, 0.02)
    merge_adapters(list(parts), tmp_path / "merged", base_model="smollm2-135m")
    unsplit = PeftModel.from_pretrained(base, str(tmp_path / "merged")).eval()
    generator = SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer, eos_token_ids=())
    ids = torch.tensor([encode_prompt(tokenizer, "What is the capital of France?")])

    tokens = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, None,
                          SamplingSettings(max_new_tokens=20)).tokens[0]

    assert tokens == reference(unsplit, ids, torch.ones_like(ids), 20)[0].tolist()
    assert generator.decode(tokens)  # real text, not an empty decode


@pytest.mark.parametrize("walk", [True, False])
def test_eval_mode_turns_training_off_and_puts_back_only_what_was_training(walk):
    from fedsplit.inference.generate import all_modules, eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    net.train()
    net[2].eval()  # a submodule already in eval mode stays so
    before = [m.training for m in net.modules()]
    x = torch.ones(2, 4)
    with eval_mode(*(all_modules(net) if not walk else [net]), walk=walk):
        assert not any(m.training for m in net.modules())
        assert torch.equal(net(x), net(x))  # no dropout
    assert [m.training for m in net.modules()] == before
