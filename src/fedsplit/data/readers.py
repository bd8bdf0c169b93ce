"""Source readers: turn a data file (or a Hugging Face dataset) into records with provenance.

A :class:`Record` is one row as a plain ``dict`` of fields plus where it came from (file and
line, or row for binary formats). Readers check the *shape* of the input (decodable, valid JSON,
one object per row, consistent CSV columns); :meth:`Record.get` checks each field when harmonization
reads it. Every :class:`DataError` names the file, the line/row and, when relevant, the field.

Formats (chosen by ``format=`` or the file suffix, see :data:`SUFFIX_FORMATS`):

- ``jsonl``: one JSON object per line; blank lines are skipped. Provenance: line number.
- ``json``: a JSON array of objects. Provenance: the line where the element starts.
- ``csv``: a header row, then one record per row (all values are strings). Provenance: line number.
- ``tsv``: as ``csv``, tab-separated.
- ``parquet``: read with pyarrow in batches. Provenance: row number (1-based).
- ``hf``: ``hf://name:split``, ``hf://owner/name:split`` or ``hf://owner/name/config:split``; needs the
  optional ``datasets`` package and access to the Hugging Face hub. Provenance: row number.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsplit.data.errors import DataError, DataUnavailableError

HF_PREFIX = "hf://"
SUFFIX_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Record:
    """One input row: its fields and its provenance."""

    fields: Mapping[str, Any]
    path: str
    line: int  # 1-based line of the row's start (jsonl, json, csv) or 1-based row number (parquet, hf)
    index: int  # 0-based position among the source's records

    @property
    def source(self) -> str:
        """``file:line`` (or ``file:row``)."""
        return f"{self.path}:{self.line}"

    def has(self, name: str) -> bool:
        """Whether the field is present and not null."""
        return self.fields.get(name) is not None

    def get(self, name: str, kinds: type | tuple[type, ...] = str) -> Any:
        """The field's value, checked to be present and of one of ``kinds`` (bool is never an int here)."""
        if name not in self.fields:
            raise self.error(f"missing field (the record has {', '.join(sorted(self.fields)) or 'no fields'})", name)
        value = self.fields[name]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(kind.__name__ for kind in kinds)
            raise self.error(f"expected {expected}, got {type(value).__name__} ({_short(value)})", name)
        return value

    def error(self, message: str, field: str | None = None) -> DataError:
        """A :class:`DataError` located at this record (and field)."""
        return DataError(message, path=self.path, line=self.line, field=field)


def detect_format(path: str | Path) -> str:
    """The reader to use for ``path``: ``hf`` for ``hf://`` URIs, else by suffix."""
    if str(path).startswith(HF_PREFIX):
        return "hf"
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise DataError(f"cannot tell the format from suffix {suffix!r}: expected one of {known}, or pass format=")
    return SUFFIX_FORMATS[suffix]


def read_records(path: str | Path, format: str | None = None) -> Iterator[Record]:
    """Yield the records of ``path`` in file order; stop with a :class:`DataError` at the first bad one."""
    fmt = format if format is not None else detect_format(path)
    if fmt not in READERS:
        raise DataError(f"format: expected one of {', '.join(sorted(READERS))}, got {fmt!r}", path=str(path))
    if fmt != "hf":
        _check_file(Path(path))
    count = 0
    for record in READERS[fmt](str(path)):
        count += 1
        yield record
    if count == 0:
        raise DataError("expected at least one record, got none (empty file)", path=str(path))


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataUnavailableError("no such file", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("expected at least one record, got an empty file", path=str(path))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_record(value: Any, path: str, line: int, index: int) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__} ({_short(value)})", path=path, line=line)
    return Record(value, path, line, index)


def _decode(raw: bytes, path: str, first_line: int = 1) -> str:
    """UTF-8 text (a leading BOM is dropped); an undecodable byte is reported with its line."""
    if first_line == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise DataError(f"not valid UTF-8 (byte {raw[exc.start]:#04x})", path=path, line=line) from None


def _read_jsonl(path: str) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as file:
        for line, raw in enumerate(file, start=1):
            text = _decode(raw, path, line)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=line) from None
            yield _as_record(value, path, line, index)
            index += 1


_BETWEEN_ELEMENTS = re.compile(r"[\s,]*")


def _read_json(path: str) -> Iterator[Record]:
    text = _decode(Path(path).read_bytes(), path)
    try:
        document = json.loads(text)  # validates the whole file first: errors carry their line
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    if not isinstance(document, list):
        raise DataError(f"expected a JSON array of objects, got {type(document).__name__}", path=path, line=1)
    for index, (value, line) in enumerate(zip(document, _element_lines(text), strict=True)):
        yield _as_record(value, path, line, index)


def _element_lines(text: str) -> Iterator[int]:
    """The line on which each top-level element of a (valid) JSON array starts."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        pos = _BETWEEN_ELEMENTS.match(text, pos).end()  # type: ignore[union-attr]  # matches empty too
        if text[pos] == "]":
            return
        line, counted = line + text.count("\n", counted, pos), pos
        yield line
        _, pos = decoder.raw_decode(text, pos)


def _read_csv(path: str, delimiter: str = ",") -> Iterator[Record]:
    rows = csv.reader(io.StringIO(_decode(Path(path).read_bytes(), path), newline=""), delimiter=delimiter)
    try:
        header = next(rows, None)
        if header is None:
            return
        header = _checked_header(header, path)
        index, start = 0, rows.line_num + 1
        for row in rows:
            line, start = start, rows.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                message = f"expected {len(header)} fields as in the header, got {len(row)}"
                raise DataError(message, path=path, line=line)
            yield Record(dict(zip(header, row, strict=True)), path, line, index)
            index += 1
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"malformed {kind}: {exc}", path=path, line=rows.line_num) from None


def _read_tsv(path: str) -> Iterator[Record]:
    return _read_csv(path, delimiter="\t")


def _checked_header(header: list[str], path: str) -> list[str]:
    names = [name.strip() for name in header]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise DataError(f"expected a header of distinct, non-empty column names, got {header}", path=path, line=1)
    return names


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", path=path) from None
    index = 0
    for batch in batches:
        for fields in batch.to_pylist():
            yield Record(fields, path, index + 1, index)
            index += 1


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://[owner/]name[/config]:split`` -> (dataset name, config or None, split).

    Two path segments are read as ``owner/name`` (how the hub names datasets today); give a config
    as a third segment: ``hf://nyu-mll/glue/rte:train``.
    """
    body = uri[len(HF_PREFIX) :] if uri.startswith(HF_PREFIX) else ""
    name_config, _, split = body.partition(":")  # the split may contain ":" (train[:10%])
    parts = name_config.split("/")
    if not split or not name_config or len(parts) > 3 or not all(parts):
        forms = "hf://name:split, hf://owner/name:split or hf://owner/name/config:split"
        raise DataError(f"expected {forms}, got {uri!r}")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2], split
    return name_config, None, split


def _read_hf(uri: str) -> Iterator[Record]:
    name, config, split = parse_hf_uri(uri)
    hint = "export the split to a local JSONL, JSON, CSV or Parquet file and pass its path instead"
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        message = f"needs the optional 'datasets' package, which is not installed: pip install datasets, or {hint}"
        raise DataUnavailableError(message, path=uri) from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    # The hub client's exception types change between versions (requests, httpx, httpx2, datasets'
    # own); whatever load_dataset raises means "not available here", and the cause stays chained.
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        message = f"could not load it from the Hugging Face hub ({cause}); if the hub is unreachable, {hint}"
        raise DataUnavailableError(message, path=uri) from exc
    for index, fields in enumerate(rows):
        yield Record(dict(fields), uri, index + 1, index)


READERS: dict[str, Callable[[str], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "hf": _read_hf,
}
