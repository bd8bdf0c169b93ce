"""Three clouds' own files of one task, each in its own shape: the data of the cross-cloud example.

From SuperGLUE RTE (``../shared/data/superglue/rte/train.jsonl``), three disjoint slices:

    data/hospital-a.jsonl  JSONL, columns text_a / text_b / verdict, labels "yes" / "no"
    data/bank-b.csv        CSV, columns sentence1 / sentence2 / label, labels 0 / 1 (GLUE's), plus two
                           rows with label 7 that the client skips and counts (on_error = "skip")
    data/lab-c.parquet     Parquet, columns premise / hypothesis / entailed, labels true / false

    python examples/cross_cloud/make_data.py [--rte PATH] [--rows 64] [--out examples/cross_cloud/data]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RTE = Path(os.environ.get("FEDSPLIT_SHARED", HERE.parents[2] / "shared")) / "data/superglue/rte/train.jsonl"


def read_rte(path: Path, count: int) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(count), strict=False)]
    if len(rows) < count:
        raise SystemExit(f"{path}: expected at least {count} rows, got {len(rows)}")
    return rows


def write_files(rows: Sequence[dict], out: Path) -> list[Path]:
    """Three disjoint thirds of ``rows``, one per cloud, each in its own shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    third = len(rows) // 3
    a, b, c = rows[:third], rows[third : 2 * third], rows[2 * third : 3 * third]
    entails = [[row["label"] == "entailment" for row in part] for part in (a, b, c)]

    jsonl = out / "hospital-a.jsonl"
    with jsonl.open("w", encoding="utf-8") as handle:
        for row, yes in zip(a, entails[0], strict=True):
            handle.write(json.dumps({"text_a": row["premise"], "text_b": row["hypothesis"],
                                     "verdict": "yes" if yes else "no"}) + "\n")
    table = out / "bank-b.csv"
    with table.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence1", "sentence2", "label"])
        writer.writerows([row["premise"], row["hypothesis"], 0 if yes else 1] for row, yes in zip(b, entails[1],
                                                                                               strict=True))
        writer.writerows([["A row from another export.", "It does not fit.", 7]] * 2)  # skipped and counted
    parquet = out / "lab-c.parquet"
    pq.write_table(pa.table({"premise": [row["premise"] for row in c], "hypothesis": [row["hypothesis"] for row in c],
                             "entailed": entails[2]}), parquet)
    return [jsonl, table, parquet]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rte", type=Path, default=DEFAULT_RTE, help="RTE train.jsonl (default: the shared data)")
    parser.add_argument("--rows", type=int, default=64, help="rows per cloud")
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args(argv)
    for path in write_files(read_rte(args.rte, 3 * args.rows), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
