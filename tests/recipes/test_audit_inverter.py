"""``fedsplit audit-inverter``: the learned attacker of the in-run audit, fitted on public text (issue 12, item 4)."""

from __future__ import annotations

from dataclasses import replace

import torch

from fedsplit.cli import main
from fedsplit.config import RunConfig
from fedsplit.recipes.run_report import client_audit


def test_the_fitted_inverter_is_what_the_clients_audit_loads(tmp_path, shared_data, monkeypatch, capsys):
    # Arrange
    monkeypatch.setenv("FEDSPLIT_SHARED", str(shared_data.parent))
    out = tmp_path / "inverter.safetensors"

    # Act
    code = main(["audit-inverter", "--model", "tiny-llama", "--positions", "2000", "--out", str(out)])

    # Assert: a random tiny p = 1 head barely moves the embeddings, so public tokens come back
    assert code == 0 and out.is_file()
    assert '"public_recovery": ' in capsys.readouterr().out
    cfg = RunConfig()
    cfg = replace(cfg, model=replace(cfg.model, name="tiny-llama"),
                  privacy=replace(cfg.privacy, audit=True, audit_inverter=str(out)))
    audit = client_audit(cfg)
    hidden = torch.randn(5, audit.inverter.weight.shape[0] - 1)
    assert audit.inverter.predict(hidden).shape == (5,)
