"""A JSON-lines metrics file: one event per line, safe to append from several threads.

Each line is ``{"time": <unix seconds>, "event": <name>, **fields}``. Tensors and numpy values
become Python numbers (or lists); a non-finite float (NaN, +-Inf; JSON has none) is written as
``null`` and its field is listed under ``"nonfinite"`` so a diverging loss stays visible.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

RESERVED = ("time", "event", "nonfinite")


class MetricsWriter:
    """Appends events to ``path`` (parent directories are created); use as a context manager.

    ``fresh=True`` starts a new run's file: a non-empty file already at ``path`` (an earlier run
    into the same directory) is kept as ``<stem>.<n>.jsonl`` (the first free ``n``) instead of
    being mixed with this run's events. A resumed run appends (``fresh=False``).
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time, fresh: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.is_file() and self.path.stat().st_size > 0:
            n = 1
            while (kept := self.path.with_name(f"{self.path.stem}.{n}{self.path.suffix}")).exists():
                n += 1
            self.path.rename(kept)
        self._clock = clock
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event line and flush it; return the record as written."""
        if not isinstance(event, str) or not event:
            raise ValueError(f"event: expected a non-empty string, got {event!r}")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"fields: expected none of the reserved names {RESERVED}, got {clash}")
        nonfinite: list[str] = []
        record: dict[str, Any] = {"time": self._clock(), "event": event}
        for name, value in fields.items():
            record[name] = to_json_value(value, name, nonfinite)
        if nonfinite:
            record["nonfinite"] = nonfinite
        line = json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file.closed:
                raise ValueError(f"MetricsWriter for {self.path} is closed")
            self._file.write(line)
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def to_json_value(value: Any, name: str, nonfinite: list[str]) -> Any:
    """``value`` as JSON data; a non-finite float becomes ``None``, its path joins ``nonfinite``."""
    if hasattr(value, "tolist") and callable(value.tolist):  # torch.Tensor, numpy array or scalar
        value = value.tolist()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite.append(name)
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {
            str(key): to_json_value(item, f"{name}.{key}", nonfinite) for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [to_json_value(item, f"{name}[{i}]", nonfinite) for i, item in enumerate(value)]
    raise TypeError(
        f"field {name!r}: expected a number, string, tensor, list or mapping, "
        f"got {type(value).__name__}"
    )


def read_metrics(path: Path | str, event: str | None = None) -> list[dict[str, Any]]:
    """The events in ``path`` in file order, only those named ``event`` if given.

    A last line without its newline is what a crash mid-write leaves behind: if it does not
    parse it is skipped with a warning. Any other malformed line is an error.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a truncated last line", stacklevel=2)
                continue
            raise ValueError(f"{path}:{number}: expected a JSON object, got {line[:80]!r}") from err
        if not isinstance(record, dict):
            got = type(record).__name__
            raise ValueError(f"{path}:{number}: expected a JSON object, got {got}")
        if event is None or record.get("event") == event:
            records.append(record)
    return records
