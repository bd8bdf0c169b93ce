"""Tests for fedsplit.data.harmonize: SourceConfig validation and explicit field mappings."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsplit.data import DataError, Message, SourceConfig, load_examples
from fedsplit.data.harmonize import label_key

Write = Callable[[str, "str | bytes"], Path]


def _jsonl(*records: dict) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


# --- explicit mappings ---------------------------------------------------------------------------


def test_csv_with_an_explicit_mapping_becomes_examples_with_provenance(write: Write) -> None:
    path = write("qa.csv", "question,answer\nWhat is 2+2?,4\r\nCapital of France?,Paris\n")
    cfg = SourceConfig(str(path), prompt_template="Q: {question}", response_field="answer", system_prompt="Be brief.")

    examples = load_examples(cfg)

    assert [e.messages for e in examples][1] == (
        Message("system", "Be brief."),
        Message("user", "Q: Capital of France?"),
        Message("assistant", "Paris"),
    )
    assert [(e.source, e.id) for e in examples] == [(f"{path}:2", "custom/qa.csv/0"), (f"{path}:3", "custom/qa.csv/1")]


def test_the_first_template_with_all_fields_filled_is_used(write: Write) -> None:
    path = write("a.jsonl", _jsonl({"i": "Do it", "x": "data", "o": "done"}, {"i": "Just do it", "x": " ", "o": "ok"}))
    cfg = SourceConfig(str(path), prompt_template=["{i}\nInput: {x}", "{i}"], response_field="o")

    prompts = [e.messages[0].content for e in load_examples(cfg)]

    assert prompts == ["Do it\nInput: data", "Just do it"]


def test_verbalizer_with_label_names_maps_indices_and_names_case_insensitively(write: Write) -> None:
    path = write("s.jsonl", _jsonl({"t": "a", "y": 0}, {"t": "b", "y": "POS"}, {"t": "c", "y": "1"}))
    mapping = {"prompt_template": "{t}", "response_field": "y", "verbalizer": {"Neg": "bad", "pos": "good"}}
    cfg = SourceConfig(str(path), **mapping, label_names=("neg", "pos"))

    assert [e.response for e in load_examples(cfg)] == ["bad", "good", "good"]


def test_verbalizer_without_label_names_matches_the_digits(write: Write) -> None:
    path = write("s.jsonl", _jsonl({"t": "a", "y": 1}, {"t": "b", "y": "0"}))
    cfg = SourceConfig(str(path), prompt_template="{t}", response_field="y", verbalizer={"0": "no", "1": "yes"})

    assert [e.response for e in load_examples(cfg)] == ["yes", "no"]


def test_limit_keeps_the_first_examples(write: Write) -> None:
    path = write("a.jsonl", _jsonl(*({"q": f"q{i}", "a": f"a{i}"} for i in range(5))))

    examples = load_examples(SourceConfig(str(path), prompt_template="{q}", response_field="a", limit=2))

    assert [e.response for e in examples] == ["a0", "a1"]


def test_blank_responses_are_skipped_only_when_asked(write: Write) -> None:
    path = write("a.jsonl", _jsonl({"q": "x", "a": ""}, {"q": "y", "a": "b"}))
    cfg = dict(path=str(path), prompt_template="{q}", response_field="a")

    kept = load_examples(SourceConfig(**cfg, on_empty_response="skip"))

    assert [e.response for e in kept] == ["b"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: field 'a': expected a non-blank response"):
        load_examples(SourceConfig(**cfg))


def test_missing_placeholder_field_names_file_line_and_field(write: Write) -> None:
    path = write("a.jsonl", _jsonl({"q": "x", "a": "y"}, {"a": "z"}))

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field 'q': missing field"):
        load_examples(SourceConfig(str(path), prompt_template="{q}", response_field="a"))


def test_placeholder_of_the_wrong_type_names_file_line_and_field(write: Write) -> None:
    path = write("a.jsonl", _jsonl({"q": None, "a": "y"}))

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: field 'q': expected str, got NoneType"):
        load_examples(SourceConfig(str(path), prompt_template="{q}", response_field="a"))


def test_blank_rendered_prompt_is_an_error(write: Write) -> None:
    path = write("a.jsonl", _jsonl({"q": "  ", "a": "y"}))

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: expected a non-blank prompt"):
        load_examples(SourceConfig(str(path), prompt_template="{q}", response_field="a"))


def test_task_system_prompt_can_be_set(write: Write) -> None:
    path = write("e.jsonl", _jsonl({"text": "t", "label": "joy"}))

    (example,) = load_examples(SourceConfig(str(path), task="emotion", system_prompt="Classify."))

    assert example.messages[0] == Message("system", "Classify.")
    assert example.id == "emotion/e.jsonl/0"


# --- SourceConfig validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "expected task=... or both prompt_template and response_field, got neither"),
        ({"prompt_template": "{q}"}, "got neither"),
        ({"task": "squad"}, "task: expected one of rte, cb, .*got 'squad'"),
        ({"task": "rte", "response_field": "label"}, r"either task or an explicit mapping, .*\['response_field'\]"),
        ({"task": "rte", "format": "yaml"}, "format: expected None or one of .*got 'yaml'"),
        ({"task": "rte", "limit": 0}, "limit: expected None or a positive int, got 0"),
        ({"task": "rte", "limit": True}, "limit: expected None or a positive int, got True"),
        ({"task": "rte", "on_empty_response": "drop"}, "on_empty_response: expected 'error' or 'skip', got 'drop'"),
        ({"prompt_template": "{q!r}", "response_field": "a"}, "plain"),
        ({"prompt_template": "{q}", "response_field": "a", "label_names": ("x",)}, "label_names: expected none"),
        ({"prompt_template": "{q}", "response_field": "a", "verbalizer": {}}, "verbalizer: expected at least one"),
        ({"prompt_template": "{q}", "response_field": "a", "system_prompt": " "}, "system_prompt: expected None or"),
    ],
)
def test_bad_config_is_rejected_with_the_contract(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SourceConfig("data.jsonl", **kwargs)


def test_empty_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="path: expected a non-empty path"):
        SourceConfig("", task="rte")


def test_a_path_object_is_stored_as_text(tmp_path: Path) -> None:
    assert SourceConfig(tmp_path / "a.jsonl", task="rte").path == str(tmp_path / "a.jsonl")  # type: ignore[arg-type]


# --- label normalization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "names", "expected"),
    [
        (True, (), "true"),
        (False, ("false", "true"), "false"),
        (2, ("a", "b", "C"), "c"),
        (" 1 ", ("a", "b"), "b"),
        (5, ("a", "b"), None),
        (3, (), "3"),
        ("Entailment", ("x",), "entailment"),
        ("٣", ("a", "b", "c", "d"), "٣"),  # a non-ASCII digit is a name, not an index
    ],
)
def test_label_key(raw: object, names: tuple[str, ...], expected: str | None) -> None:
    assert label_key(raw, names) == expected  # type: ignore[arg-type]
