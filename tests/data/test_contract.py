"""Tests for fedsplit.data.contract: three differently shaped files onto one label space, local
validation with file/line/field errors or counted skips, a report with counts only, and the
contract's hash and field-level diff."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsplit.config import RunConfig
from fedsplit.configio import ConfigError, load_config
from fedsplit.data import (
    ClientSource,
    ContractError,
    ContractMismatchError,
    DataContract,
    DataError,
    DataReport,
    check_same_contract,
    check_source,
    contract_diff,
    contract_hash,
    load_client_data,
)
from fedsplit.data.contract import contract_from_dict, contract_to_dict, tokenizer_fingerprint

Write = Callable[[str, "str | bytes"], Path]

CONTRACT = DataContract(
    prompt_template="Review: {text}\nIs this review positive or negative?",
    labels=["positive", "negative"],
    verbalizer={"positive": "positive", "negative": "negative"},
    tokenizer="tiny-llama",
    max_length=256,
)
SECRET = "my-private-review-text"


@pytest.fixture
def three_files(write: Write, tmp_path: Path) -> list[ClientSource]:
    """JSONL with 'pos'/'neg' strings, CSV with 0/1 ints (other column names), Parquet with booleans."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write("a.jsonl", "\n".join(json.dumps(r) for r in [
        {"review": f"{SECRET} great", "sentiment": "pos"}, {"review": "awful", "sentiment": "NEG"},
        {"review": "fine", "sentiment": "pos"}]) + "\n")  # fmt: skip
    csv = write("b.csv", "body,y\nloved it,1\nhated it,0\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["good", "bad", "meh"], "is_good": [True, False, False]}), parquet)
    return [
        ClientSource(path=str(jsonl), fields={"text": "review"}, label_field="sentiment",
                     label_map={"pos": "positive", "neg": "negative"}),
        ClientSource(path=str(csv), fields={"text": "body"}, label_field="y",
                     label_map={"1": "positive", "0": "negative"}),
        ClientSource(path=str(parquet), label_field="is_good", label_map={"true": "positive", "false": "negative"}),
    ]  # fmt: skip


def test_three_shapes_map_onto_one_label_space(three_files: list[ClientSource]) -> None:
    data = load_client_data(CONTRACT, three_files)

    jsonl, csv, parquet = ["positive", "negative", "positive"], ["positive", "negative"], ["positive", "negative"] * 1
    assert data.labels == jsonl + csv + parquet + ["negative"]
    assert [e.response for e in data.examples] == data.labels
    assert data.examples[3].messages[0].content == "Review: loved it\nIs this review positive or negative?"
    assert data.examples[5].source.endswith("c.parquet:1")
    assert data.report.label_histogram == {"negative": 4, "positive": 4}
    assert data.report.num_examples == 8 and data.report.num_rejected == 0


def test_report_has_counts_only(three_files: list[ClientSource], tiny_tokenizer) -> None:
    data = load_client_data(CONTRACT, three_files, tiny_tokenizer)
    text = json.dumps(data.report.to_dict())

    assert set(data.report.to_dict()) == {
        "num_examples", "label_histogram", "num_truncated", "num_rejected", "rejected", "contract_hash",
        "fraction_truncated"}  # fmt: skip
    assert SECRET not in text and "loved" not in text and "a.jsonl" not in text
    assert data.encoded is not None and len(data.encoded) == 8
    assert data.report.fraction_truncated == 0.0


def test_report_round_trips_and_bad_reports_are_refused(three_files: list[ClientSource]) -> None:
    report = load_client_data(CONTRACT, three_files).report
    wire = json.loads(json.dumps(report.to_dict()))

    assert DataReport.from_dict(wire) == report
    with pytest.raises(ContractError, match="num_examples: expected an int >= 0"):
        DataReport.from_dict({**wire, "num_examples": -1})
    with pytest.raises(ContractError, match="expected fields"):
        DataReport.from_dict({**wire, "first_rows": ["x"]})
    with pytest.raises(ContractError, match="label_histogram"):
        DataReport.from_dict({**wire, "label_histogram": {"positive": "many"}})


def test_tokenizer_hash_is_checked(three_files: list[ClientSource], tiny_tokenizer) -> None:
    pinned = DataContract(**{**contract_to_dict(CONTRACT), "tokenizer_hash": tokenizer_fingerprint(tiny_tokenizer)})
    wrong = DataContract(**{**contract_to_dict(CONTRACT), "tokenizer_hash": "0" * 64})

    assert load_client_data(pinned, three_files, tiny_tokenizer).report.num_examples == 8
    with pytest.raises(ContractError, match="tokenizer: its vocabulary hash"):
        load_client_data(wrong, three_files, tiny_tokenizer)


def test_truncation_is_counted(three_files: list[ClientSource], tiny_tokenizer) -> None:
    short = DataContract(**{**contract_to_dict(CONTRACT), "max_length": 8})

    data = load_client_data(short, three_files, tiny_tokenizer)

    assert data.report.num_truncated == 8 and data.report.fraction_truncated == 1.0
    assert all(len(e.input_ids) <= 8 for e in data.encoded or [])


def test_bad_row_names_file_line_and_field(write: Write) -> None:
    path = write("bad.csv", "body,y\nok,1\nnot ok,7\n")
    source = ClientSource(path=str(path), fields={"text": "body"}, label_field="y", label_map={"1": "positive"})

    with pytest.raises(DataError, match=f"{path}:3: field 'y': unknown label '7'"):
        load_client_data(CONTRACT, [source])


def test_skipped_rows_are_counted_by_reason(write: Write) -> None:
    path = write("bad.jsonl", "\n".join(json.dumps(r) for r in [
        {"text": "a", "label": "positive"}, {"text": "b", "label": "maybe"}, {"text": " ", "label": "negative"},
        {"label": "negative"}, {"text": "c", "label": [1]}, {"text": "d", "label": "Negative"}]))  # fmt: skip
    source = ClientSource(path=str(path), on_error="skip")

    data = load_client_data(CONTRACT, [source])

    assert data.labels == ["positive", "negative"]
    assert data.report.num_rejected == 4
    assert data.report.rejected == {
        "source 0: field 'label': unknown label": 1, "source 0: field 'label': wrong type": 1,
        "source 0: field 'text': blank": 1, "source 0: field 'text': missing field": 1}  # fmt: skip
    assert "maybe" not in json.dumps(data.report.to_dict())


def test_schema_that_does_not_map_is_refused_before_reading() -> None:
    unknown_label = ClientSource(path="never-read.csv", label_map={"1": "very positive"})
    unknown_field = ClientSource(path="never-read.csv", fields={"title": "t"})

    with pytest.raises(ContractError, match="'very positive'.*not contract labels"):
        check_source(CONTRACT, unknown_label)
    with pytest.raises(ContractError, match="'title'.*does not use"):
        check_source(CONTRACT, unknown_field)


def test_template_override_and_text_format(write: Write) -> None:
    path = write("s.jsonl", json.dumps({"dialogue": "A: hi", "summary": "A greets."}) + "\n")
    text = DataContract(prompt_template="Summarize:\n{context}", response_format="text", system_prompt="Be brief.")
    source = ClientSource(path=str(path), fields={"context": "dialogue"}, response_field="summary")
    override = ClientSource(path=str(path), prompt_template="Dialogue: {dialogue}", response_field="summary")

    plain, own = load_client_data(text, [source]), load_client_data(text, [override])

    assert [m.content for m in plain.examples[0].messages] == ["Be brief.", "Summarize:\nA: hi", "A greets."]
    assert own.examples[0].messages[1].content == "Dialogue: A: hi"
    assert plain.report.label_histogram == {} and plain.labels == [None]


def test_contract_hash_and_diff_name_the_field() -> None:
    other = DataContract(**{**contract_to_dict(CONTRACT), "labels": ["negative", "positive"], "max_length": 128})

    assert contract_hash(CONTRACT) == contract_hash(contract_from_dict(contract_to_dict(CONTRACT)))
    assert contract_hash(CONTRACT) != contract_hash(other)
    assert contract_diff(CONTRACT, other) == ["labels", "max_length"]
    assert contract_diff(CONTRACT, CONTRACT) == []
    with pytest.raises(ContractMismatchError, match="differs from the server's in labels, max_length") as err:
        check_same_contract(CONTRACT, other)
    assert err.value.fields == ["labels", "max_length"]


def test_contract_validation() -> None:
    with pytest.raises(ValueError, match="contract.labels"):
        DataContract(prompt_template="{x}", labels=["a", "A"])
    with pytest.raises(ValueError, match="verbalizer"):
        DataContract(prompt_template="{x}", labels=["a"], verbalizer={"b": "B"})
    with pytest.raises(ValueError, match="text"):
        DataContract(prompt_template="{x}", response_format="text", labels=["a"])


def test_contract_and_sources_in_toml(tmp_path: Path, write: Write) -> None:
    csv = write("b.csv", "body,y\nloved it,1\nhated it,0\n")
    config = tmp_path / "client.toml"
    config.write_text(f'''
[contract]
prompt_template = "Review: {{text}}\\nIs this review positive or negative?"
labels = ["positive", "negative"]
max_length = 256
[contract.verbalizer]
positive = "positive"
negative = "negative"

[client]
id = "client-1"
[[client.sources]]
path = "{csv}"
fields = {{ text = "body" }}
label_field = "y"
label_map = {{ 1 = "positive", 0 = "negative" }}
[[client.sources]]
path = "{csv}"
format = "csv"
fields = {{ text = "body" }}
label_field = "y"
label_map = {{ 1 = "positive", 0 = "negative" }}
limit = 1
''')

    cfg = load_config(RunConfig, config)
    data = load_client_data(cfg.contract, cfg.client.sources)

    assert contract_diff(cfg.contract, DataContract(**{**contract_to_dict(CONTRACT), "tokenizer": ""})) == []
    assert data.labels == ["positive", "negative", "positive"]
    with pytest.raises(ConfigError, match="on_error"):
        load_config(RunConfig, config, ['client.sources=[{path = "x.csv", on_error = "ignore"}]'])
