"""The data contract: one canonical task for the run, each client's own files mapped onto it.

Cross-cloud federation (arXiv 2503.12226, "cross-cloud data harmonization") joins parties whose
data differ in shape: one cloud's labels are 0/1, another's "pos"/"neg", a third's true/false.
The run declares the task once (:class:`DataContract`, TOML ``[contract]``): the prompt template
over canonical field names, the label space and each label's verbalized answer, the response
format, the tokenizer and the maximum length. Each client declares its own sources
(:class:`ClientSource`, TOML ``[[client.sources]]``): the file, which of its columns holds each
canonical field, how its raw labels map onto the contract's labels, and optional template
overrides. Everything is checked locally, before the client joins::

    check_source(contract, source)        the schema maps onto the contract (no data read)
    load_client_data(contract, sources)   rows -> Example (+ tokens), and a DataReport

A bad row stops with a :class:`~fedsplit.data.errors.DataError` naming file, line and field,
or, with ``on_error = "skip"``, is skipped and counted. Only the :class:`DataReport` (counts: examples, label
histogram, truncated, rejected rows by reason) ever leaves the client. The handshake carries
:func:`contract_hash`; a side holding the other's contract names the differing fields with
:func:`contract_diff` (:func:`check_same_contract`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedsplit.data.readers import READERS, Record, read_records
from fedsplit.data.schema import Example
from fedsplit.data.tasks import template_fields

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedsplit.data.tokenize import EncodedExample

RESPONSE_FORMATS = ("label", "text")
ON_ERROR = ("raise", "skip")
REJECT_KINDS = ("missing field", "wrong type", "blank", "unknown label")


class ContractError(ValueError):
    """A contract is malformed, or a client's schema does not map onto it."""


class ContractMismatchError(ContractError):
    """Two parties hold different contracts; ``fields`` names the fields that differ."""

    def __init__(self, message: str, fields: Sequence[str]) -> None:
        super().__init__(message)
        self.fields = list(fields)


@dataclass
class DataContract:
    """The run's canonical task. An empty ``prompt_template`` means the run declares no contract."""

    prompt_template: str = field(default="", metadata={"help": "'{field}' template over canonical field names"})
    system_prompt: str = field(default="", metadata={"help": "system turn of every example ('' = none)"})
    response_format: Literal["label", "text"] = field(
        default="label", metadata={"help": "'label': the answer is a label's verbalization; 'text': a free-text field"}
    )
    labels: list[str] = field(default_factory=list, metadata={"help": "the canonical label space (label format)"})
    verbalizer: dict[str, str] = field(
        default_factory=dict, metadata={"help": "label -> answer text (labels left out answer with their own name)"}
    )
    tokenizer: str = field(default="", metadata={"help": "tokenizer (model) name every client encodes with"})
    tokenizer_hash: str = field(default="", metadata={"help": "sha256 of its vocabulary (tokenizer_fingerprint)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are truncated"})

    def __post_init__(self) -> None:
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"contract.response_format: expected label or text, got {self.response_format!r}")
        if type(self.max_length) is not int or self.max_length < 2:
            raise ValueError(f"contract.max_length: expected an int >= 2, got {self.max_length!r}")
        if not self.declared:
            return
        template_fields(self.prompt_template)  # plain {field} placeholders only
        if self.response_format == "text":
            if self.labels or self.verbalizer:
                raise ValueError("contract: expected no labels or verbalizer with response_format = 'text'")
            return
        names = [label.strip() for label in self.labels]
        if not names or not all(names) or len({n.lower() for n in names}) != len(names):
            raise ValueError(f"contract.labels: expected distinct non-blank labels, got {self.labels!r}")
        unknown = sorted(set(self.verbalizer) - set(self.labels))
        if unknown:
            raise ValueError(f"contract.verbalizer: expected keys among the labels {self.labels}, got {unknown}")
        blank = [label for label, answer in self.verbalizer.items() if not answer.strip()]
        if blank:
            raise ValueError(f"contract.verbalizer: expected a non-blank answer for every label, got blank for {blank}")

    @property
    def declared(self) -> bool:
        return bool(self.prompt_template)

    @property
    def fields(self) -> tuple[str, ...]:
        """The canonical fields the prompt template uses."""
        return template_fields(self.prompt_template)

    def answer(self, label: str) -> str:
        """The verbalized answer of a canonical label."""
        return self.verbalizer.get(label, label)

    def canonical_label(self, name: str) -> str | None:
        """The contract's spelling of ``name`` (matched case-insensitively), or None."""
        wanted = name.strip().lower()
        return next((label for label in self.labels if label.lower() == wanted), None)


@dataclass
class ClientSource:
    """One of a client's own files and how its schema maps onto the contract."""

    path: str = field(metadata={"help": "file path (jsonl/json/csv/tsv/parquet) or hf://[owner/]name[/config]:split"})
    format: str = field(default="", metadata={"help": "jsonl, json, csv, tsv, parquet or hf ('' = by suffix)"})
    fields: dict[str, str] = field(
        default_factory=dict, metadata={"help": "canonical field -> this file's column (unlisted: same name)"}
    )
    label_field: str = field(default="label", metadata={"help": "column holding the label (label format)"})
    response_field: str = field(default="response", metadata={"help": "column holding the answer (text format)"})
    label_map: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "raw label -> contract label; raw keys as text: '0', 'pos', 'true' ({} = same names)"},
    )
    prompt_template: str = field(default="", metadata={"help": "override: template over this file's own columns"})
    system_prompt: str = field(default="", metadata={"help": "override of the contract's system turn"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a row that does not fit: 'raise' (file:line: field) or 'skip' (counted)"}
    )
    limit: int = field(default=0, metadata={"help": "keep at most this many examples (0 = all)"})

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"source.path: expected a non-empty path, got {self.path!r}")
        self.path = str(self.path)
        if self.format and self.format not in READERS:
            raise ValueError(f"source.format: expected '' or one of {', '.join(READERS)}, got {self.format!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"source.on_error: expected 'raise' or 'skip', got {self.on_error!r}")
        if type(self.limit) is not int or self.limit < 0:
            raise ValueError(f"source.limit: expected an int >= 0, got {self.limit!r}")
        if self.prompt_template:
            template_fields(self.prompt_template)
        self.label_map = {_raw_key(raw): label for raw, label in self.label_map.items()}


@dataclass(frozen=True)
class DataReport:
    """What a client tells the server about its data: aggregate counts only, never a row."""

    num_examples: int
    label_histogram: dict[str, int]  # contract label -> examples (label format; empty for text)
    num_truncated: int  # examples longer than max_length (counted only when tokenized)
    num_rejected: int
    rejected: dict[str, int]  # "source 0: field 'label': unknown label" -> rows skipped
    contract_hash: str

    @property
    def fraction_truncated(self) -> float:
        return self.num_truncated / self.num_examples if self.num_examples else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers and names (for the lobby log, metrics and the wire)."""
        return {**dataclasses.asdict(self), "fraction_truncated": self.fraction_truncated}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataReport:
        """A report received from a client, checked: counts are ints >= 0, names are strings."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {key: value for key, value in data.items() if key != "fraction_truncated"}
        if set(fields) != known:
            raise ContractError(f"data report: expected fields {sorted(known)}, got {sorted(fields)}")
        for name in ("num_examples", "num_truncated", "num_rejected"):
            _check_count(fields[name], name)
        for name in ("label_histogram", "rejected"):
            if not isinstance(fields[name], Mapping):
                got = type(fields[name]).__name__
                raise ContractError(f"data report: {name}: expected a table of counts, got {got}")
            for key, count in fields[name].items():
                if not isinstance(key, str):
                    raise ContractError(f"data report: {name}: expected string keys, got {key!r}")
                _check_count(count, f"{name}[{key!r}]")
        if not isinstance(fields["contract_hash"], str):
            raise ContractError("data report: contract_hash: expected a hex string")
        if fields["num_truncated"] > fields["num_examples"]:
            raise ContractError("data report: expected num_truncated <= num_examples")
        tables = {name: dict(fields[name]) for name in ("label_histogram", "rejected")}
        return cls(**{**fields, **tables})


def _check_count(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContractError(f"data report: {name}: expected an int >= 0, got {value!r}")


@dataclass
class ClientData:
    examples: list[Example]
    encoded: list[EncodedExample] | None  # when a tokenizer was given
    labels: list[str | None]  # each example's contract label (None for text tasks)
    report: DataReport


# -- the contract's identity --------------------------------------------------------------------
def contract_hash(contract: DataContract) -> str:
    """sha256 (hex) of the contract's canonical JSON: equal contracts, equal hashes."""
    text = json.dumps(dataclasses.asdict(contract), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def contract_diff(a: DataContract, b: DataContract) -> list[str]:
    """The names of the fields whose values differ, in declaration order."""
    return [f.name for f in dataclasses.fields(DataContract) if getattr(a, f.name) != getattr(b, f.name)]


def contract_to_dict(contract: DataContract) -> dict[str, Any]:
    return dataclasses.asdict(contract)


def contract_from_dict(data: Mapping[str, Any]) -> DataContract:
    """The inverse of :func:`contract_to_dict` (e.g. a contract received as JSON); unknown keys fail."""
    known = {f.name for f in dataclasses.fields(DataContract)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ContractError(f"contract: unknown fields {unknown}; expected {sorted(known)}")
    return DataContract(**dict(data))


def check_same_contract(ours: DataContract, theirs: DataContract, *, theirs_name: str = "the server") -> None:
    """Raise :class:`ContractMismatchError` naming each differing field and both values."""
    differing = contract_diff(ours, theirs)
    if differing:
        details = "; ".join(f"{name}: ours {getattr(ours, name)!r}, {theirs_name}'s {getattr(theirs, name)!r}"
                            for name in differing)
        raise ContractMismatchError(f"data contract differs from {theirs_name}'s in {', '.join(differing)} ({details})",
                                    differing)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the sorted vocabulary (the same fingerprint the run-config hash uses)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


# -- one client's sources ----------------------------------------------------------------------
def check_source(contract: DataContract, source: ClientSource) -> None:
    """Raise :class:`ContractError` unless ``source``'s declared schema maps onto ``contract``."""
    if not contract.declared:
        raise ContractError("the run declares no data contract ([contract] prompt_template is empty)")
    where = f"source {source.path}"
    stray = sorted(set(source.fields) - set(contract.fields))
    if stray and not source.prompt_template:
        raise ContractError(f"{where}: fields maps {stray}, which the contract's template does not use "
                            f"(it uses {list(contract.fields)})")
    if contract.response_format == "text":
        if source.label_map:
            raise ContractError(f"{where}: label_map given, but the contract's response_format is 'text'")
        return
    outside = sorted({label for label in source.label_map.values() if contract.canonical_label(label) is None})
    if outside:
        raise ContractError(f"{where}: label_map maps to {outside}, which are not contract labels {contract.labels}")


def load_client_data(
    contract: DataContract,
    sources: Sequence[ClientSource],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ClientData:
    """Read every source, map each row onto the contract, validate it; tokenize when given a tokenizer."""
    if not sources:
        raise ContractError("expected at least one data source for this client, got none")
    for source in sources:
        check_source(contract, source)
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None and contract.tokenizer_hash else ""
    if fingerprint and fingerprint != contract.tokenizer_hash:
        raise ContractError(
            f"tokenizer: its vocabulary hash {fingerprint[:12]}... differs from the contract's "
            f"tokenizer_hash {contract.tokenizer_hash[:12]}... ({contract.tokenizer or 'unnamed'})"
        )
    examples: list[Example] = []
    labels: list[str | None] = []
    rejected: Counter[str] = Counter()
    for number, source in enumerate(sources):
        kept = 0
        for record in read_records(source.path, source.format or None):
            try:
                example, label = to_contract_example(record, contract, source, id=f"source{number}/{record.index}")
            except _Rejected as reject:
                if source.on_error == "raise":
                    raise record.error(reject.message, reject.field) from None
                rejected[f"source {number}: field {reject.field!r}: {reject.kind}"] += 1
                continue
            examples.append(example)
            labels.append(label)
            kept += 1
            if kept == source.limit:
                break
    encoded, truncated = _encode(examples, tokenizer, contract.max_length)
    report = DataReport(
        num_examples=len(examples),
        label_histogram=dict(sorted(Counter(label for label in labels if label is not None).items())),
        num_truncated=truncated,
        num_rejected=sum(rejected.values()),
        rejected=dict(sorted(rejected.items())),
        contract_hash=contract_hash(contract),
    )
    return ClientData(examples, encoded, labels, report)


def _encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase | None, max_length: int
) -> tuple[list[EncodedExample] | None, int]:
    if tokenizer is None:
        return None, 0
    from fedsplit.data.tokenize import encode_and_truncate

    pairs = [encode_and_truncate(example, tokenizer, max_length) for example in examples]
    return [encoded for encoded, _ in pairs], sum(truncated for _, truncated in pairs)


class _Rejected(Exception):
    """A row that does not fit the contract: what is wrong (``kind``), where, and the full message."""

    def __init__(self, kind: str, field: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.field, self.message = kind, field, message


def to_contract_example(
    record: Record, contract: DataContract, source: ClientSource, *, id: str
) -> tuple[Example, str | None]:
    """One row as a canonical :class:`Example` and its contract label; ``_Rejected`` if it does not fit."""
    if source.prompt_template:  # the client's own template, over its own columns
        template, columns = source.prompt_template, {f: f for f in template_fields(source.prompt_template)}
    else:
        template, columns = contract.prompt_template, {f: source.fields.get(f, f) for f in contract.fields}
    values = {name: _text(record, column) for name, column in columns.items()}
    prompt = _clean(template.format_map(values))
    if contract.response_format == "text":
        label, response = None, _text(record, source.response_field)
    else:
        label = _label(record, contract, source)
        response = contract.answer(label)
    system = source.system_prompt or contract.system_prompt or None
    return Example.from_pair(prompt, _clean(response), source=record.source, id=id, system=system), label


def _text(record: Record, column: str) -> str:
    if record.fields.get(column) is None:
        have = ", ".join(sorted(record.fields)) or "no fields"
        raise _Rejected("missing field", column, f"missing field (the row has {have})")
    value = record.fields[column]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Rejected("wrong type", column, f"expected text or a number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise _Rejected("blank", column, "expected non-blank text, got blank")
    return text


def _label(record: Record, contract: DataContract, source: ClientSource) -> str:
    column = source.label_field
    if record.fields.get(column) is None:
        have = ", ".join(sorted(record.fields)) or "no fields"
        raise _Rejected("missing field", column, f"missing label (the row has {have})")
    raw = record.fields[column]
    if not isinstance(raw, (str, int, bool)) and not (isinstance(raw, float) and raw.is_integer()):
        raise _Rejected("wrong type", column, f"expected a label (text, int or bool), got {type(raw).__name__}")
    key = _raw_key(raw)
    mapped = source.label_map.get(key) if source.label_map else key
    label = contract.canonical_label(mapped) if mapped is not None else None
    if label is None:
        known = sorted(source.label_map) if source.label_map else contract.labels
        raise _Rejected("unknown label", column, f"unknown label {raw!r}: expected one of {known}")
    return label


def _raw_key(raw: str | int | float | bool) -> str:
    """A raw label as a lookup key: booleans 'true'/'false', integers their digits, text lower-cased."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, float):
        return str(int(raw))
    return str(raw).strip().lower()


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()
