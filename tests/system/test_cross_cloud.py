"""The cross-cloud example as real processes (issue 10, "done when"): three clients with three differently
shaped files of one task (JSONL with string labels, CSV with integer labels, Parquet with booleans) train
together through `fedsplit server` and `fedsplit client`, each on its own files; the server names no data.

The shipped configs of examples/cross_cloud/ are used as they are, with the model swapped for
tiny-llama and the run shortened by ``--set`` on every process alike.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from fedsplit.config import RunConfig
from fedsplit.configio import load_config
from fedsplit.metrics import read_metrics
from fedsplit.recipes.keygen import run_keygen
from fedsplit.recipes.network import _spawn, free_port

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cross_cloud"
CLIENTS = ["client-0", "client-1", "client-2"]


def make_data(rte: Path, out: Path, rows: int) -> None:
    spec = importlib.util.spec_from_file_location("cross_cloud_make_data", EXAMPLE / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--rte", str(rte), "--rows", str(rows), "--out", str(out)])


def test_three_clouds_with_three_file_shapes_train_together(tmp_path, shared_data, monkeypatch):
    # Arrange: the example's configs, its data (12 RTE rows per cloud), keys for the server and 3 clients
    rte = shared_data / "superglue" / "rte" / "train.jsonl"
    if not rte.is_file():
        pytest.skip(f"RTE not found at {rte}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ["server", *CLIENTS]:
        shutil.copy(EXAMPLE / f"{name}.toml", tmp_path / f"{name}.toml")
    make_data(rte, tmp_path / "data", rows=12)
    run_keygen(tmp_path / "keys", "server", with_ca=True)
    for cid in CLIENTS:
        run_keygen(tmp_path / "keys", cid)
    agreed = ["--set", f"server.address=127.0.0.1:{free_port()}", "--set", "model.name=tiny-llama",
              "--set", "contract.tokenizer=tiny-llama", "--set", "federation.rounds=1",
              "--set", "federation.local_steps=2", "--set", "server.join_grace_s=60"]

    # Act
    procs = {"server": _spawn(["server", "--config", str(tmp_path / "server.toml"), "--out", str(tmp_path / "server"),
                               *agreed, "--set", "server.threads=1"], tmp_path / "logs" / "server.log")}
    for cid in CLIENTS:
        procs[cid] = _spawn(["client", "--config", str(tmp_path / f"{cid}.toml"), "--out", str(tmp_path / cid),
                             *agreed], tmp_path / "logs" / f"{cid}.log")
    try:
        codes = {name: proc.wait(timeout=120) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    # Assert: the round ran with all three; each one's report arrived, counts only
    logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in procs}
    assert codes == dict.fromkeys(procs, 0), {name: logs[name][-2000:] for name, code in codes.items() if code}
    metrics = tmp_path / "server" / "metrics.jsonl"
    (end,) = read_metrics(metrics, "round_end")
    assert sorted(end["clients"]) == CLIENTS and end["failures"] == []
    reports = {e["client"]: e["data"] for e in read_metrics(metrics, "data_report")}
    assert sorted(reports) == CLIENTS
    for report in reports.values():
        assert report["num_examples"] == 12 and sum(report["label_histogram"].values()) == 12
        assert set(report["label_histogram"]) <= {"entailment", "not_entailment"}
    assert reports["client-1"]["rejected"] == {"source 0: field 'label': unknown label": 2}
    assert "client client-1 joined: 12 examples" in logs["server"] and "2 rows rejected" in logs["server"]
    assert "link shaping:" in logs["client-2"]
    assert (tmp_path / "server" / "adapters" / "merged" / "adapter_config.json").is_file()
    server_cfg = load_config(RunConfig, tmp_path / "server.toml")
    assert server_cfg.client.sources == [] and "data/" not in (tmp_path / "server.toml").read_text()
