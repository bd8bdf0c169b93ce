from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsplit.metrics import MetricsWriter, read_metrics


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "runs" / "a" / "metrics.jsonl"  # parent dirs do not exist yet

    # Act
    with MetricsWriter(path, clock=lambda: 12.5) as writer:
        writer.write("train", step=1, loss=2.5, mode="split")
        writer.write("eval", round=1, rouge_l=0.3)

    # Assert
    assert read_metrics(path) == [
        {"time": 12.5, "event": "train", "step": 1, "loss": 2.5, "mode": "split"},
        {"time": 12.5, "event": "eval", "round": 1, "rouge_l": 0.3},
    ]
    assert [r["event"] for r in read_metrics(path, event="eval")] == ["eval"]


def test_each_line_is_flushed_before_close(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(path)

    writer.write("train", loss=1.0)

    assert read_metrics(path)[0]["loss"] == 1.0
    writer.close()


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as writer:
        writer.write("a")

    with MetricsWriter(path) as writer:
        writer.write("b")

    assert [r["event"] for r in read_metrics(path)] == ["a", "b"]


def test_tensors_and_numpy_values_become_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"

    with MetricsWriter(path) as writer:
        writer.write(
            "train",
            loss=torch.tensor(1.5),
            bf16=torch.tensor(0.25, dtype=torch.bfloat16),
            np_float=np.float32(0.5),
            np_int=np.int64(7),
            vector=torch.tensor([1.0, 2.0]),
            nested={"a": np.float64(3.0)},
            where=Path("/tmp/x"),
        )

    record = read_metrics(path)[0]
    assert record["loss"] == 1.5 and record["bf16"] == 0.25 and record["np_float"] == 0.5
    assert record["np_int"] == 7 and isinstance(record["np_int"], int)
    assert record["vector"] == [1.0, 2.0]
    assert record["nested"] == {"a": 3.0}
    assert record["where"] == "/tmp/x"


def test_non_finite_values_are_null_and_listed(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"

    with MetricsWriter(path) as writer:
        writer.write(
            "train",
            loss=float("nan"),
            grad_norm=torch.tensor(float("inf")),
            ok=1.0,
            parts={"x": -np.inf},
        )

    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    record = json.loads(text)
    assert record["loss"] is None and record["grad_norm"] is None and record["parts"] == {"x": None}
    assert record["ok"] == 1.0
    assert record["nonfinite"] == ["loss", "grad_norm", "parts.x"]


def test_finite_record_has_no_nonfinite_field(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "m.jsonl") as writer:
        record = writer.write("train", loss=1.0)

    assert "nonfinite" not in record


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "m.jsonl"
    threads_count, per_thread = 8, 200
    payload = "x" * 500  # long lines make torn writes likely if unlocked

    # Act
    with MetricsWriter(path) as writer:

        def work(thread: int) -> None:
            for i in range(per_thread):
                writer.write("tick", thread=thread, i=i, payload=payload)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # Assert
    records = read_metrics(path)
    assert len(records) == threads_count * per_thread
    for t in range(threads_count):
        assert [r["i"] for r in records if r["thread"] == t] == list(range(per_thread))


def test_reserved_and_unsupported_fields_are_rejected(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "m.jsonl") as writer:
        with pytest.raises(ValueError, match=r"reserved names.*got \['time'\]"):
            writer.write("train", time=3.0)
        with pytest.raises(TypeError, match="field 'model': expected a number"):
            writer.write("train", model=object())
        with pytest.raises(ValueError, match="event: expected a non-empty string"):
            writer.write("")


def test_write_after_close_is_an_error(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.close()

    with pytest.raises(ValueError, match="is closed"):
        writer.write("train")


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"time": 1, "event": "a"}\n{"time": 2, "ev')

    with pytest.warns(UserWarning, match="truncated last line"):
        records = read_metrics(path)

    assert records == [{"time": 1, "event": "a"}]


def test_malformed_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"time": 1, "event": "a"}\nnot json\n{"time": 2, "event": "b"}\n')

    with pytest.raises(ValueError, match=r"m.jsonl:2: expected a JSON object"):
        read_metrics(path)


def test_a_fresh_run_keeps_the_earlier_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as metrics:
        metrics.write("round_end", round=1)
    with MetricsWriter(path, fresh=True) as metrics:
        metrics.write("round_end", round=7)
    with MetricsWriter(path, fresh=True) as metrics:
        metrics.write("round_end", round=9)

    assert [r["round"] for r in read_metrics(path, "round_end")] == [9]
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.1.jsonl", "round_end")] == [1]
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.2.jsonl", "round_end")] == [7]
