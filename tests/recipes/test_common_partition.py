"""data.partition re-splits the simulation pool: same examples, deterministic, skewed as asked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedsplit.config import DataConfig
from fedsplit.recipes.common import load_federated_data


def _ids(silos) -> list[list[str]]:
    return [[example.id for example in silo] for silo in silos]


def test_stdlib_docs_dirichlet_partition_keeps_the_pool_and_is_deterministic() -> None:
    default = load_federated_data(DataConfig(num_clients=3), seed=0)
    skewed = load_federated_data(DataConfig(num_clients=5, partition="dirichlet", partition_alpha=0.1), seed=0)
    again = load_federated_data(DataConfig(num_clients=5, partition="dirichlet", partition_alpha=0.1), seed=0)

    assert sorted(e.id for e in skewed.pooled) == sorted(e.id for e in default.pooled)
    assert _ids(skewed.silos) == _ids(again.silos) and len(skewed.silos) == 5
    assert [e.id for e in skewed.eval] == [e.id for e in default.eval]


def test_files_iid_partition(tmp_path: Path) -> None:
    rows = "".join(f'{{"text": "t{i}", "label": "{["joy", "fear"][i % 2]}"}}\n' for i in range(40))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "eval.jsonl").write_text(rows)
    cfg = DataConfig(dataset="files", task="emotion", train_path=str(tmp_path / "train.jsonl"),
                     eval_path=str(tmp_path / "eval.jsonl"), num_clients=4, partition="iid")  # fmt: skip

    data = load_federated_data(cfg, seed=1)

    assert sorted(len(silo) for silo in data.silos) == [10, 10, 10, 10]
    assert Counter(e.response for e in data.pooled) == {"joy": 20, "fear": 20}


def test_unknown_partition_is_rejected() -> None:
    with pytest.raises(ValueError, match="data.partition"):
        DataConfig(partition="round-robin")  # type: ignore[arg-type]
