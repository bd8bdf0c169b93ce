"""Tests for fedsplit.data.tokenize: the loss mask covers exactly the response and its end-of-turn
token, truncation keeps the response, and collation pads on either side."""

from __future__ import annotations

import pytest
import torch

from fedsplit.data import IGNORE_INDEX, DataError, EncodedExample, Example, Message, collate, encode_example
from fedsplit.data.tokenize import render_plain
from fedsplit.models.tokenizer import build_tiny_tokenizer

PROMPT, RESPONSE = "What does `json.dumps` do?", "Serialize obj to a JSON formatted str."
EXAMPLE = Example.from_pair(PROMPT, RESPONSE, source="qa.jsonl:7", id="t/0")


def _supervised_text(tokenizer, encoded: EncodedExample) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def _tokenizer_with_template(template: str | None):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


# --- the loss mask -------------------------------------------------------------------------------


def test_supervised_tokens_are_the_response_and_its_end_of_turn(tiny_tokenizer) -> None:
    encoded = encode_example(EXAMPLE, tiny_tokenizer, max_length=512)

    assert _supervised_text(tiny_tokenizer, encoded) == RESPONSE + "<|im_end|>"
    assert tiny_tokenizer.decode(encoded.input_ids) == (
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{RESPONSE}<|im_end|>"
    )


def test_supervised_tokens_are_one_contiguous_span_at_the_end(tiny_tokenizer) -> None:
    encoded = encode_example(EXAMPLE, tiny_tokenizer, max_length=512)

    first = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in encoded.labels[:first])
    assert encoded.labels[first:] == encoded.input_ids[first:]


def test_only_the_last_assistant_turn_is_supervised(tiny_tokenizer) -> None:
    turns = [Message("system", "S"), Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2"),
             Message("assistant", "a2")]  # fmt: skip
    example = Example(turns, source="chat.jsonl:1", id="t/0")

    encoded = encode_example(example, tiny_tokenizer, max_length=512)

    assert _supervised_text(tiny_tokenizer, encoded) == "a2<|im_end|>"
    assert "a1" in tiny_tokenizer.decode(encoded.input_ids)


def test_without_a_chat_template_the_plain_format_is_used() -> None:
    tokenizer = _tokenizer_with_template(None)

    encoded = encode_example(EXAMPLE, tokenizer, max_length=512)

    assert tokenizer.decode(encoded.input_ids) == f"User: {PROMPT}\n\nAssistant: {RESPONSE}<|im_end|>"
    assert _supervised_text(tokenizer, encoded) == f" {RESPONSE}<|im_end|>"


def test_render_plain_spells_out_the_documented_format() -> None:
    messages = [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]

    assert render_plain(messages, "</s>", add_generation_prompt=False) == "System: S\n\nUser: U\n\nAssistant: A</s>\n\n"
    assert render_plain(messages[:2], "</s>", add_generation_prompt=True) == "System: S\n\nUser: U\n\nAssistant:"


def test_eos_is_appended_when_the_template_has_no_end_of_turn_token() -> None:
    tokenizer = _tokenizer_with_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )

    encoded = encode_example(EXAMPLE, tokenizer, max_length=512)

    assert _supervised_text(tokenizer, encoded) == RESPONSE + "<|im_end|>"


def test_a_template_that_drops_the_response_is_an_error_naming_the_source() -> None:
    users_only = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    tokenizer = _tokenizer_with_template(users_only)

    with pytest.raises(DataError, match=r"qa\.jsonl:7: .*no response tokens"):
        encode_example(EXAMPLE, tokenizer, max_length=512)


# --- truncation ----------------------------------------------------------------------------------


def test_a_long_prompt_is_cut_from_the_left_and_the_response_kept(tiny_tokenizer) -> None:
    full = encode_example(EXAMPLE, tiny_tokenizer, max_length=512)
    max_length = len(RESPONSE) + 20  # byte-level: the response and its end-of-turn take len + 1 tokens

    encoded = encode_example(EXAMPLE, tiny_tokenizer, max_length=max_length)

    assert len(encoded.input_ids) == max_length
    assert encoded.input_ids == full.input_ids[-max_length:]
    assert _supervised_text(tiny_tokenizer, encoded) == RESPONSE + "<|im_end|>"
    assert tiny_tokenizer.decode(encoded.input_ids).endswith(f"<|im_start|>assistant\n{RESPONSE}<|im_end|>")


def test_a_response_that_does_not_fit_keeps_one_prompt_token_and_its_start(tiny_tokenizer) -> None:
    encoded = encode_example(EXAMPLE, tiny_tokenizer, max_length=6)

    assert len(encoded.input_ids) == 6
    assert encoded.labels[0] == IGNORE_INDEX
    assert tiny_tokenizer.decode(encoded.input_ids) == "\n" + RESPONSE[:5]
    assert _supervised_text(tiny_tokenizer, encoded) == RESPONSE[:5]


def test_an_example_that_fits_is_not_truncated(tiny_tokenizer) -> None:
    full = encode_example(EXAMPLE, tiny_tokenizer, max_length=512)

    encoded = encode_example(EXAMPLE, tiny_tokenizer, max_length=len(full.input_ids))

    assert encoded == full


@pytest.mark.parametrize("max_length", [1, 0, 2.5])
def test_max_length_below_two_cannot_supervise_anything(tiny_tokenizer, max_length: object) -> None:
    with pytest.raises(ValueError, match="max_length: expected an int >= 2"):
        encode_example(EXAMPLE, tiny_tokenizer, max_length=max_length)  # type: ignore[arg-type]


# --- collation -----------------------------------------------------------------------------------

SHORT = EncodedExample([5, 6], [IGNORE_INDEX, 6])
LONG = EncodedExample([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])


def test_collate_pads_on_the_right() -> None:
    batch = collate([SHORT, LONG], pad_token_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100], [-100, -100, 3, 4]]


def test_collate_pads_on_the_left() -> None:
    batch = collate([SHORT, LONG], pad_token_id=9, padding_side="left")

    assert batch["input_ids"].tolist() == [[9, 9, 5, 6], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6], [-100, -100, 3, 4]]


def test_collate_returns_long_tensors_of_shape_batch_by_time_and_no_position_ids() -> None:
    batch = collate([SHORT, LONG, SHORT], pad_token_id=0)

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in batch.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": []}, "batch: expected at least one"),
        ({"padding_side": "top"}, "padding_side: expected one of right, left, got 'top'"),
        ({"pad_token_id": -1}, "pad_token_id: expected a non-negative int, got -1"),
        ({"pad_token_id": None}, "pad_token_id: expected a non-negative int, got None"),
    ],
)
def test_collate_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"batch": [SHORT], "pad_token_id": 0, **kwargs}

    with pytest.raises(ValueError, match=match):
        collate(**arguments)


def test_encoded_example_needs_equally_long_ids_and_labels() -> None:
    with pytest.raises(ValueError, match="got lengths 2 and 1"):
        EncodedExample([1, 2], [IGNORE_INDEX])


def test_encoded_examples_of_a_real_batch_collate(tiny_tokenizer) -> None:
    other = Example.from_pair("Hi", "Hello!", source="qa.jsonl:8", id="t/1")
    encoded = [encode_example(e, tiny_tokenizer, max_length=64) for e in (EXAMPLE, other)]

    batch = collate(encoded, pad_token_id=tiny_tokenizer.pad_token_id)

    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e.input_ids) for e in encoded]
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == sum(e.num_supervised for e in encoded)
