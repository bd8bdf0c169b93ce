"""Tests for fedsplit.data.tasks: each task template on the real shared files, and the verbalizers'
handling of the labels' various raw types."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsplit.data import TASKS, DataError, FieldMapping, SourceConfig, load_examples
from fedsplit.data.tasks import EMOTIONS, template_fields

Write = Callable[[str, "str | bytes"], Path]


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _responses(path: Path, task: str) -> list[str]:
    return [example.response for example in load_examples(SourceConfig(str(path), task=task))]


# --- the real shared files -----------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize(("name", "rows"), [("train", 2490), ("val", 277)])
def test_rte_string_labels_become_yes_no(shared_data: Path, name: str, rows: int) -> None:
    path = shared_data / "superglue/rte" / f"{name}.jsonl"

    responses = _responses(path, "rte")

    expected = ["yes" if r["label"] == "entailment" else "no" for r in _raw(path)]
    assert len(responses) == rows
    assert responses == expected


@pytest.mark.shared
@pytest.mark.parametrize("name", ["train", "val"])  # train: ints 0/1/2, val: strings
def test_cb_int_and_string_labels_become_yes_no_maybe(shared_data: Path, name: str) -> None:
    path = shared_data / "superglue/cb" / f"{name}.jsonl"
    names = ["entailment", "contradiction", "neutral"]
    verbal = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}

    responses = _responses(path, "cb")

    expected = [verbal[r["label"] if isinstance(r["label"], str) else names[r["label"]]] for r in _raw(path)]
    assert responses == expected
    assert set(responses) == {"yes", "no", "maybe"}


@pytest.mark.shared
@pytest.mark.parametrize("name", ["train", "val"])
def test_copa_answers_with_the_chosen_sentence(shared_data: Path, name: str) -> None:
    path = shared_data / "superglue/copa" / f"{name}.jsonl"

    examples = load_examples(SourceConfig(str(path), task="copa"))

    raw = _raw(path)
    assert [e.response for e in examples] == [r["choice2"] if r["label"] else r["choice1"] for r in raw]
    assert f"What was the {raw[0]['question']}?" in examples[0].messages[0].content


@pytest.mark.shared
@pytest.mark.parametrize(("name", "field"), [("train", "answer"), ("val", "label")])
def test_boolq_reads_answer_in_train_and_label_in_val(shared_data: Path, name: str, field: str) -> None:
    path = shared_data / "superglue/boolq" / f"{name}.jsonl"

    responses = _responses(path, "boolq")

    assert responses == ["yes" if r[field] else "no" for r in _raw(path)]


@pytest.mark.shared
def test_samsum_summarizes_the_dialogue(shared_data: Path) -> None:
    path = shared_data / "samsum/validation.jsonl"

    examples = load_examples(SourceConfig(str(path), task="samsum"))

    first = _raw(path)[0]
    assert len(examples) == 818
    assert examples[0].response == first["response"].strip()
    assert first["context"].replace("\r\n", "\n").strip() in examples[0].messages[0].content
    assert "\r" not in examples[0].messages[0].content


@pytest.mark.shared
def test_alpaca_uses_the_input_only_when_present(shared_data: Path) -> None:
    path = shared_data / "alpaca/alpaca_data_first5000.json"

    examples = load_examples(SourceConfig(str(path), task="alpaca", on_empty_response="skip"))

    raw = [r for r in json.loads(path.read_text(encoding="utf-8")) if r["output"].strip()]
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert len(examples) == 4996  # 4 of the first 5000 have an empty output
    assert examples[0].messages[0].content == raw[0]["instruction"]
    assert examples[with_input].messages[0].content.endswith("Input:\n" + raw[with_input]["input"].strip())


@pytest.mark.shared
def test_alpaca_empty_output_is_an_error_by_default(shared_data: Path) -> None:
    path = shared_data / "alpaca/alpaca_data_first5000.json"

    with pytest.raises(DataError, match=r"alpaca_data_first5000\.json:1422: field 'output': .*blank"):
        load_examples(SourceConfig(str(path), task="alpaca"))


@pytest.mark.shared
def test_emotion_answers_with_the_label_word(shared_data: Path) -> None:
    path = shared_data / "emotion/validation.jsonl"

    responses = _responses(path, "emotion")

    assert responses == [r["label"] for r in _raw(path)]
    assert set(responses) == set(EMOTIONS)


# --- verbalizer edge cases on tiny files ---------------------------------------------------------


def _one(write: Write, task: str, record: dict) -> str:
    path = write(f"{task}.jsonl", json.dumps(record) + "\n")
    (example,) = load_examples(SourceConfig(str(path), task=task))
    return example.response


NLI = {"premise": "p", "hypothesis": "h"}


@pytest.mark.parametrize(
    ("label", "expected"),
    [("entailment", "yes"), ("not_entailment", "no"), (" Not_Entailment ", "no"), (0, "yes"), (1, "no"), ("1", "no")],
)
def test_rte_label_types(write: Write, label: object, expected: str) -> None:
    assert _one(write, "rte", {**NLI, "label": label}) == expected


@pytest.mark.parametrize(
    ("label", "expected"),
    [(0, "yes"), (1, "no"), (2, "maybe"), ("1", "no"), ("contradiction", "no"), ("neutral", "maybe")],
)
def test_cb_label_types(write: Write, label: object, expected: str) -> None:
    assert _one(write, "cb", {**NLI, "label": label}) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"answer": True}, "yes"),
        ({"answer": False}, "no"),
        ({"label": True}, "yes"),
        ({"label": False}, "no"),
        ({"label": "True"}, "yes"),
        ({"label": "false"}, "no"),
        ({"label": 1}, "yes"),
        ({"label": "0"}, "no"),
    ],
)
def test_boolq_answer_or_label_of_any_type(write: Write, record: dict, expected: str) -> None:
    assert _one(write, "boolq", {"question": "q", "passage": "p", **record}) == expected


def test_copa_label_one_picks_the_second_choice(write: Write) -> None:
    record = {"premise": "p", "question": "effect", "choice1": "First.", "choice2": "Second.", "label": 1}

    assert _one(write, "copa", record) == "Second."


def test_emotion_integer_label_uses_the_dataset_label_order(write: Write) -> None:
    assert _one(write, "emotion", {"text": "t", "label": 2}) == "love"


@pytest.mark.parametrize("label", [3, "3", "unsure", -1])
def test_unknown_label_names_file_line_field_and_value(write: Write, label: object) -> None:
    path = write("cb.jsonl", json.dumps({**NLI, "label": 0}) + "\n" + json.dumps({**NLI, "label": label}) + "\n")

    expected = rf"^{re.escape(str(path))}:2: field 'label': unknown label {label!r}: expected one of"
    with pytest.raises(DataError, match=expected):
        load_examples(SourceConfig(str(path), task="cb"))


def test_label_of_an_unsupported_type_is_a_type_error_in_the_data(write: Write) -> None:
    path = write("cb.jsonl", json.dumps({**NLI, "label": 1.5}) + "\n")

    expected = rf"^{re.escape(str(path))}:1: field 'label': expected str or int or bool, got float"
    with pytest.raises(DataError, match=expected):
        load_examples(SourceConfig(str(path), task="cb"))


def test_missing_label_field_names_it(write: Write) -> None:
    path = write("rte.jsonl", json.dumps(NLI) + "\n")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: field 'label': missing field"):
        load_examples(SourceConfig(str(path), task="rte"))


# --- the table and FieldMapping validation -------------------------------------------------------


def test_every_task_names_its_fields_with_plain_placeholders() -> None:
    for mapping in TASKS.values():
        assert all(template_fields(t) for t in mapping.prompt_templates)
        assert mapping.response_fields


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{a.b}", "plain"),
        ("{a!r}", "plain"),
        ("{a:>3}", "plain"),
        ("{0}", "plain"),
        ("{a", "balanced"),
        ("  ", "blank"),
    ],
)
def test_template_fields_rejects_anything_but_plain_names(template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        template_fields(template)


def test_label_names_must_be_verbalizer_keys() -> None:
    with pytest.raises(ValueError, match=r"label_names: expected every name to be a verbalizer key, .* \['b'\]"):
        FieldMapping(("{x}",), ("label",), verbalizer={"a": "A"}, label_names=("a", "b"))


def test_verbalizer_keys_that_collide_case_insensitively_are_rejected() -> None:
    with pytest.raises(ValueError, match="collide"):
        FieldMapping(("{x}",), ("label",), verbalizer={"Yes": "y", "yes": "y"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_templates": "{x}"}, "prompt_templates: expected a non-empty tuple of templates, got '{x}'"),
        ({"prompt_templates": ()}, r"prompt_templates: expected a non-empty tuple of templates, got \(\)"),
        ({"response_fields": "label"}, "response_fields: expected non-empty field names, got 'label'"),
        ({"response_fields": ("",)}, "response_fields: expected non-empty field names"),
    ],
)
def test_field_mapping_wants_tuples_of_names(kwargs: dict, match: str) -> None:
    arguments = {"prompt_templates": ("{x}",), "response_fields": ("y",), **kwargs}

    with pytest.raises(ValueError, match=match):
        FieldMapping(**arguments)
