"""A network client's own files under the run's data contract: read, mapped and checked locally, before
it dials; only the report leaves. The contract is part of the handshake, one section per field."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedsplit.config import ClientConfig, RunConfig, run_config_hash, run_config_sections
from fedsplit.configio import load_config
from fedsplit.data import ClientSource, ContractError, DataContract, DataError, contract_diff, contract_hash
from fedsplit.recipes.own_data import own_client_batches, report_message, resolve_sources
from fedsplit.security.errors import ConfigMismatchError
from fedsplit.security.handshake import HandshakeVerifier, client_hello
from fedsplit.security.identity import generate_identity

CONTRACT = DataContract(
    prompt_template="{premise}\nQuestion: {hypothesis} True or False?",
    labels=["entailment", "not_entailment"],
    verbalizer={"entailment": "True", "not_entailment": "False"},
    tokenizer="tiny-llama",
    max_length=48,
)
ROWS = [("The cat sat on the mat.", "A cat sat.", True), ("It rained all day.", "The sun shone all day.", False),
        ("Ann wrote a book.", "Ann is an author.", True), ("Bob left at noon.", "Bob stayed.", False)]


@pytest.fixture(scope="module")
def tokenizer():
    from fedsplit.models import load_model

    return load_model("tiny-llama")[1]


def three_shapes(folder: Path) -> list[ClientSource]:
    """JSONL with 'yes'/'no', CSV with 0/1 (and one bad row), Parquet with booleans; relative paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text_a": p, "text_b": h, "verdict": "yes" if y else "no"})
                                            + "\n" for p, h, y in ROWS))
    (folder / "b.csv").write_text("sentence1,sentence2,label\n" + "".join(
        f"{p},{h},{0 if y else 1}\n" for p, h, y in ROWS) + "Odd row.,Odd claim.,7\n")
    pq.write_table(pa.table({"premise": [r[0] for r in ROWS], "hypothesis": [r[1] for r in ROWS],
                             "entailed": [r[2] for r in ROWS]}), folder / "c.parquet")
    return [
        ClientSource(path="data/a.jsonl", fields={"premise": "text_a", "hypothesis": "text_b"}, label_field="verdict",
                     label_map={"yes": "entailment", "no": "not_entailment"}),
        ClientSource(path="data/b.csv", fields={"premise": "sentence1", "hypothesis": "sentence2"},
                     label_map={"0": "entailment", "1": "not_entailment"}, on_error="skip"),
        ClientSource(path="data/c.parquet", label_field="entailed",
                     label_map={"true": "entailment", "false": "not_entailment"}),
    ]


def client_config(sources: list[ClientSource], **contract) -> RunConfig:
    cfg = RunConfig()
    return replace(cfg, model=replace(cfg.model, name="tiny-llama"), train=replace(cfg.train, batch_size=4,
                   max_length=64), contract=replace(CONTRACT, **contract), client=ClientConfig(sources=sources))


def test_three_shapes_become_batches_and_a_report_of_counts(tmp_path, tokenizer):
    # Arrange: the files sit next to the client's config file, named relative to it
    cfg = client_config(three_shapes(tmp_path / "data"))

    # Act
    batches, report = own_client_batches(cfg, tmp_path, tokenizer)

    # Assert: 12 examples -> 3 batches of 4; the CSV's label 7 skipped and counted
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    assert report.num_examples == 12 and report.label_histogram == {"entailment": 6, "not_entailment": 6}
    assert report.rejected == {"source 1: field 'label': unknown label": 1}
    assert report.contract_hash == contract_hash(cfg.contract)
    wire = report_message(report).SerializeToString()
    assert b"cat" not in wire and b"data/" not in wire and b"Odd" not in wire


def test_a_bad_row_stops_the_client_naming_file_line_and_field(tmp_path, tokenizer):
    sources = three_shapes(tmp_path / "data")
    sources[1] = replace(sources[1], on_error="raise")

    with pytest.raises(DataError, match=r"data/b\.csv:6: field 'label': unknown label '7'"):
        own_client_batches(client_config(sources), tmp_path, tokenizer)


@pytest.mark.parametrize(("change", "match"), [
    ({"prompt_template": "", "labels": [], "verbalizer": {}}, "needs the run's data contract"),
    ({"max_length": 128}, r"contract.max_length \(128\) must be <= train.max_length \(64\)"),
    ({"tokenizer": "smollm2-135m"}, "contract.tokenizer is 'smollm2-135m'"),
])
def test_a_contract_the_client_cannot_honour_is_refused_before_it_dials(tmp_path, tokenizer, change, match):
    cfg = client_config(three_shapes(tmp_path / "data"), **change)

    with pytest.raises(ContractError, match=match):
        own_client_batches(cfg, tmp_path, tokenizer)


def test_paths_resolve_against_the_config_directory_and_hf_uris_stay(tmp_path):
    sources = [ClientSource(path="data/a.jsonl"), ClientSource(path="hf://org/set:train"),
               ClientSource(path=str(tmp_path / "abs.csv"))]

    resolved = resolve_sources(sources, tmp_path / "conf")

    assert [s.path for s in resolved] == [str(tmp_path / "conf" / "data" / "a.jsonl"), "hf://org/set:train",
                                          str(tmp_path / "abs.csv")]


def test_sources_and_contract_load_from_toml(tmp_path):
    (tmp_path / "client.toml").write_text('''
[contract]
prompt_template = "{premise}\\nQuestion: {hypothesis} True or False?"
labels = ["entailment", "not_entailment"]
verbalizer = { entailment = "True", not_entailment = "False" }

[[client.sources]]
path = "data/c.parquet"
label_field = "entailed"
label_map = { true = "entailment", false = "not_entailment" }

[[client.sources]]
path = "data/b.csv"
label_map = { 0 = "entailment", 1 = "not_entailment" }
on_error = "skip"

[link]
latency_ms = 20
bandwidth_mbps = 50
''')

    cfg = load_config(RunConfig, tmp_path / "client.toml")

    assert [s.label_map for s in cfg.client.sources] == [{"true": "entailment", "false": "not_entailment"},
                                                         {"0": "entailment", "1": "not_entailment"}]
    assert cfg.link.latency_ms == 20 and cfg.link.active


def test_a_client_with_another_contract_is_refused_naming_the_fields_that_differ(tokenizer):
    # Arrange: the server's and the client's contracts differ in the labels' answers and the length
    server_cfg = client_config([])
    client_cfg = client_config([], verbalizer={"entailment": "yes", "not_entailment": "no"}, max_length=32)
    server_key, client_key = generate_identity(), generate_identity()
    verifier = HandshakeVerifier(server_key, {"c": client_key.public_key()}, [], 3,
                                 run_config_hash(server_cfg, tokenizer), run_id="run",
                                 config_sections=run_config_sections(server_cfg, tokenizer))
    hello = client_hello(client_key, "run", "c", run_config_hash(client_cfg, tokenizer), protocol_version=3,
                         config_sections=run_config_sections(client_cfg, tokenizer)).hello

    # Act
    with pytest.raises(ConfigMismatchError) as refused:
        verifier.accept(hello)

    # Assert
    differing = contract_diff(server_cfg.contract, client_cfg.contract)
    assert differing == ["verbalizer", "max_length"]
    assert "sections that differ: contract.max_length, contract.verbalizer " in str(refused.value)
