"""Tests for fedsplit.data.readers: every format yields records with provenance, and every kind of
bad input stops with a DataError naming the file, the line/row and the field."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsplit.data import DataError, DataUnavailableError, Record, detect_format, read_records
from fedsplit.data.readers import parse_hf_uri

Write = Callable[[str, "str | bytes"], Path]


def _lines_and_fields(path: Path, **kwargs: str) -> list[tuple[int, dict]]:
    return [(r.line, dict(r.fields)) for r in read_records(path, **kwargs)]


# --- formats -------------------------------------------------------------------------------------


def test_jsonl_records_carry_their_line_and_blank_lines_are_skipped(write: Write) -> None:
    path = write("a.jsonl", '{"x": 1}\n\n{"x": 2}\n')

    records = list(read_records(path))

    assert [(r.line, r.index, r.fields["x"]) for r in records] == [(1, 0, 1), (3, 1, 2)]
    assert records[1].source == f"{path}:3"


def test_jsonl_with_a_byte_order_mark_is_read(write: Write) -> None:
    path = write("bom.jsonl", '\ufeff{"x": "y"}\n'.encode())

    assert _lines_and_fields(path) == [(1, {"x": "y"})]


def test_json_array_records_carry_the_line_where_each_element_starts(write: Write) -> None:
    path = write("a.json", '[\n  {"x": 1},\n  {\n    "x": [1, 2]\n  }, {"x": "]"}\n]\n')

    assert _lines_and_fields(path) == [(2, {"x": 1}), (3, {"x": [1, 2]}), (5, {"x": "]"})]


def test_csv_records_are_strings_keyed_by_the_stripped_header(write: Write) -> None:
    path = write("a.csv", 'premise, label\n"two\nlines",1\nshort,0\n')

    records = _lines_and_fields(path)

    assert records == [(2, {"premise": "two\nlines", "label": "1"}), (4, {"premise": "short", "label": "0"})]


def test_parquet_records_carry_their_row_number(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)

    assert _lines_and_fields(path) == [(1, {"text": "a", "label": 0}), (2, {"text": "b", "label": 1})]


def test_tsv_records_are_tab_separated_strings_with_their_line(write: Write) -> None:
    path = write("a.tsv", "text\tlabel\nhello, world\t1\n\nbye\t0\n")

    assert _lines_and_fields(path) == [(2, {"text": "hello, world", "label": "1"}), (4, {"text": "bye", "label": "0"})]


def test_tsv_row_with_the_wrong_number_of_fields_names_the_line(write: Write) -> None:
    path = write("a.tsv", "text\tlabel\nonly-one-field\n")

    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected 2 fields")):
        list(read_records(path))


def test_explicit_format_overrides_the_suffix(write: Write) -> None:
    path = write("data.txt", '{"x": 1}\n')

    assert _lines_and_fields(path, format="jsonl") == [(1, {"x": 1})]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.json", "json"), ("a.csv", "csv"), ("a.parquet", "parquet"),
     ("a.tsv", "tsv"), ("hf://dair-ai/emotion:train", "hf")],
)  # fmt: skip
def test_format_is_detected_from_the_suffix(name: str, expected: str) -> None:
    assert detect_format(name) == expected


def test_unknown_suffix_asks_for_an_explicit_format() -> None:
    with pytest.raises(DataError, match=r"suffix '\.txt'.*format="):
        detect_format("notes.txt")


def test_unknown_explicit_format_is_rejected(write: Write) -> None:
    path = write("a.jsonl", '{"x": 1}\n')

    with pytest.raises(DataError, match="format: expected one of .*got 'yaml'"):
        list(read_records(path, format="yaml"))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", ""), ("e.json", ""), ("e.csv", ""), ("e.parquet", ""), ("w.jsonl", "\n  \n"), ("a.json", "[ ]"),
     ("h.csv", "text,label\n")],
)  # fmt: skip
def test_empty_input_is_an_error_naming_the_file(write: Write, name: str, content: str) -> None:
    path = write(name, content)

    with pytest.raises(DataError, match="empty") as caught:
        list(read_records(path))
    assert str(path) in str(caught.value)


def test_missing_file_is_reported_as_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="no such file"):
        list(read_records(tmp_path / "absent.jsonl"))


def test_invalid_json_line_names_file_and_line(write: Write) -> None:
    path = write("bad.jsonl", '{"x": 1}\n{"x": \n')

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        list(read_records(path))


def test_undecodable_bytes_name_file_and_line(write: Write) -> None:
    path = write("bad.jsonl", b'{"x": 1}\n{"x": "caf\xe9"}\n')

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(byte 0xe9\)"):
        list(read_records(path))


def test_undecodable_bytes_in_a_csv_with_a_byte_order_mark_name_the_line(write: Write) -> None:
    path = write("bad.csv", b"\xef\xbb\xbftext\nok\n\xff\n")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid UTF-8 \(byte 0xff\)"):
        list(read_records(path))


def test_jsonl_row_that_is_not_an_object_names_file_and_line(write: Write) -> None:
    path = write("bad.jsonl", '{"x": 1}\n[1, 2]\n')

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: expected a JSON object, got list"):
        list(read_records(path))


def test_json_element_that_is_not_an_object_names_its_line(write: Write) -> None:
    path = write("bad.json", '[\n {"x": 1},\n "oops"\n]')

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: expected a JSON object, got str"):
        list(read_records(path))


def test_invalid_json_document_names_the_line(write: Write) -> None:
    path = write("bad.json", '[\n {"x": 1},\n {"x": }\n]')

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        list(read_records(path))


def test_json_document_that_is_not_an_array_is_rejected(write: Write) -> None:
    path = write("obj.json", '{"data": []}')

    with pytest.raises(DataError, match="expected a JSON array of objects, got dict"):
        list(read_records(path))


def test_csv_row_with_the_wrong_number_of_fields_names_the_line(write: Write) -> None:
    path = write("bad.csv", "a,b\n1,2\n3\n")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: expected 2 fields as in the header, got 1"):
        list(read_records(path))


def test_csv_with_duplicate_header_names_is_rejected(write: Write) -> None:
    path = write("dup.csv", "a,a\n1,2\n")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: expected a header of distinct"):
        list(read_records(path))


def test_unreadable_parquet_is_an_error_naming_the_file(write: Write) -> None:
    path = write("bad.parquet", b"not parquet at all")

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
        list(read_records(path))


# --- field access --------------------------------------------------------------------------------


def test_missing_field_names_file_line_and_field() -> None:
    record = Record({"premise": "p"}, "rte.jsonl", 12, 11)

    with pytest.raises(DataError, match=r"^rte\.jsonl:12: field 'hypothesis': missing field \(the record has premise"):
        record.get("hypothesis")


def test_wrong_type_names_file_line_field_and_types() -> None:
    record = Record({"premise": 5}, "rte.jsonl", 12, 11)

    with pytest.raises(DataError, match=r"^rte\.jsonl:12: field 'premise': expected str, got int \(5\)"):
        record.get("premise")


def test_a_bool_is_not_accepted_as_an_int() -> None:
    record = Record({"label": True}, "f.jsonl", 1, 0)

    with pytest.raises(DataError, match="expected int, got bool"):
        record.get("label", int)


def test_get_returns_a_value_of_an_accepted_type() -> None:
    record = Record({"label": 2}, "f.jsonl", 1, 0)

    assert record.get("label", (str, int)) == 2


# --- Hugging Face datasets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://emotion:train", ("emotion", None, "train")),
        ("hf://dair-ai/emotion:validation", ("dair-ai/emotion", None, "validation")),
        ("hf://nyu-mll/glue/rte:train[:10]", ("nyu-mll/glue", "rte", "train[:10]")),
    ],
)
def test_hf_uri_is_parsed(uri: str, expected: tuple) -> None:
    assert parse_hf_uri(uri) == expected


@pytest.mark.parametrize("uri", ["hf://emotion", "hf://:train", "hf://a/b/c/d:train", "hf://a//b:x", "emotion:x"])
def test_malformed_hf_uri_shows_the_expected_form(uri: str) -> None:
    with pytest.raises(DataError, match="expected hf://name:split"):
        parse_hf_uri(uri)


def test_hf_without_the_datasets_package_says_how_to_use_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail

    with pytest.raises(DataUnavailableError, match=r"hf://dair-ai/emotion:train: .*'datasets' package.*local"):
        list(read_records("hf://dair-ai/emotion:train"))


def test_hf_hub_failure_is_reported_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, config: str | None, split: str) -> list:
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    with pytest.raises(DataUnavailableError, match=r"Hugging Face hub \(ConnectionError: no route to host\).*local"):
        list(read_records("hf://dair-ai/emotion:train"))


def test_hf_rows_become_records_with_row_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str | None, split: str) -> list:
        calls.append((name, config, split))
        return [{"text": "a", "label": 0}, {"text": "b", "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    records = list(read_records("hf://nyu-mll/glue/rte:train"))

    assert calls == [("nyu-mll/glue", "rte", "train")]
    assert [(r.source, r.fields["text"]) for r in records] == [
        ("hf://nyu-mll/glue/rte:train:1", "a"),
        ("hf://nyu-mll/glue/rte:train:2", "b"),
    ]
