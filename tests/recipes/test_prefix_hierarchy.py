"""P-tuning v2 in server-hierarchical mode over the network (fedsplit.recipes.prefix_network with
``server.mode = "hierarchical"``): the real ``run_server`` (root + 2 ``fedsplit subserver`` processes) and
two ``run_client`` threads over loopback gRPC on tiny-llama, P = 3 prefixes per block."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedsplit.config import (
    ClientConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    HierarchyConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    ServerConfig,
)
from fedsplit.recipes import network
from fedsplit.split.prefix import part_prefix
from fedsplit.train.config import TrainConfig

from tiny import run_federation_in_threads

P = 3
ROUNDS = 2
PARTS = ("adapters", "exp_avg", "exp_avg_sq")


def hierarchical_prefix_config(port: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name="tiny-llama", head_layers=1, tail_layers=1),
        train=TrainConfig(lr=1e-2, batch_size=2, max_length=24, warmup_steps=0),
        data=DataConfig(num_clients=2, max_train_examples=24, max_eval_examples=4),
        federation=FederationConfig(rounds=ROUNDS, local_steps=2),
        eval=EvalConfig(federated=False, rouge_examples=0),
        server=ServerConfig(address=f"127.0.0.1:{port}", threads=1, join_grace_s=2.0, join_timeout_s=60.0,
                            mode="hierarchical"),
        hierarchy=HierarchyConfig(subservers=2, sync_every=8, threads=1, sync_timeout_s=30.0, drain_timeout_s=30.0,
                                  relay_deadline_s=60.0),
        security=SecurityConfig(insecure=True, run_id="prefix-hier-run"),
        client=ClientConfig(threads=1),
        method=MethodConfig(name="prefix", num_virtual_tokens=P),
    )


@pytest.mark.slow
def test_a_hierarchical_prefix_run_averages_the_replicas_trunk_prefixes_and_saves_one_peft_adapter(
        tmp_path, monkeypatch):
    # Arrange: the real server (its router spawns 2 sub-servers) and two client threads; every round-end
    # sync is watched: each rank's state just before it and just after it
    from fedsplit.server.hierarchy.router import ReplicaRouter

    cfg = hierarchical_prefix_config(network.free_port())
    server_toml, _ = network.write_federation(cfg, tmp_path)  # keys: the server's, the root's, one per client
    cfg = replace(cfg, security=replace(cfg.security, keys_dir=str((tmp_path / "keys").resolve()),
                                        clients=["client-0", "client-1"]))
    syncs: list[tuple[int, dict, object, dict]] = []
    end_round = ReplicaRouter.end_round

    def watched(self, round):
        before = self.replica_states()
        report = end_round(self, round)
        syncs.append((round, before, report, self.replica_states()))
        return report

    monkeypatch.setattr(ReplicaRouter, "end_round", watched)

    # Act
    code, errors = run_federation_in_threads(cfg, server_toml.parent, tmp_path)

    # Assert: the run completed and every round ended with an averaging sync of both replicas
    assert code == 0 and not errors
    assert [r for r, *_ in syncs] == list(range(1, ROUNDS + 1))
    _, initial = network.build_parts(cfg, role="server")
    start = _adapters(initial.trunk)  # the seeded trunk prefixes every rank started from
    for _, before, report, after in syncs:
        assert report.ok and report.status == "done" and set(before) == set(after) == {0, 1, 2}
        steps = {rank: before[rank].steps_since for rank in (1, 2)}
        assert steps == {1: 2, 2: 2}  # one client per replica, local_steps = 2
        assert any(not torch.equal(before[1].adapters[k], before[2].adapters[k]) for k in start)  # they diverged
        for rank in (0, 1):  # the root and replica 1 hold replica 2's bytes: one averaged state everywhere
            for part in PARTS:
                assert all(torch.equal(getattr(after[rank], part)[k], getattr(after[2], part)[k]) for k in start)
        total = sum(steps.values())
        for part in PARTS:  # ... which is the step-weighted mean of what the replicas held
            for key in start:
                mean = sum(steps[r] / total * getattr(before[r], part)[key].double() for r in (1, 2))
                torch.testing.assert_close(getattr(after[1], part)[key].double(), mean, rtol=1e-6, atol=1e-9)
    final = syncs[-1][3][0].adapters  # the root's trunk prefixes after the last averaging
    assert set(final) == set(start) and all("prefix_tuning." in k for k in start)
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1e-3  # they trained

    # the run's one PEFT prefix adapter: loads on the unsplit model; its trunk rows are the averaged prefixes
    table = _load_peft_table(tmp_path / "server" / "adapters" / "prefix")  # (P, N * 2 * kv_heads * head_dim)
    layers = initial.tail.layer_indices[-1] + 1
    grid = table.view(P, layers * 2, -1)  # (P, 2N, kv_heads * head_dim)
    for layer in initial.trunk.layer_indices:
        for i, which in enumerate(("key", "value")):
            averaged = final[f"base_model.model.prefix_tuning.{which}.{layer}"]  # (kv_heads, P, head_dim)
            assert torch.equal(grid[:, 2 * layer + i], averaged.permute(1, 0, 2).flatten(1))

    # the last checkpoint holds the averaged trunk prefixes (what --resume pushes to the replicas) and the
    # global head/tail prefixes, which are the adapter's other rows
    from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint

    found = latest_checkpoint(tmp_path / "server" / "checkpoints")
    assert found is not None
    checkpoint = load_checkpoint(found)
    assert checkpoint.round == ROUNDS and checkpoint.trunk.adapters.keys() == final.keys()
    assert all(torch.equal(checkpoint.trunk.adapters[k], final[k]) for k in final)
    for name in ("head", "tail"):
        for layer in getattr(initial, name).layer_indices:
            for i, which in enumerate(("key", "value")):
                value = checkpoint.global_adapters[f"{name}/base_model.model.prefix_tuning.{which}.{layer}"]
                assert torch.equal(grid[:, 2 * layer + i], value.permute(1, 0, 2).flatten(1))


def _adapters(trunk) -> dict[str, torch.Tensor]:
    from fedsplit.adapters import adapter_state_dict

    assert part_prefix(trunk) is not None
    return adapter_state_dict(trunk)


def _load_peft_table(directory) -> torch.Tensor:
    """The adapter loaded with ``peft.PeftModel.from_pretrained`` on the unsplit tiny-llama, run once."""
    import warnings

    from peft import PeftModel

    from fedsplit.models import load_model

    model, _ = load_model("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(model, str(directory))
        with torch.no_grad():
            logits = loaded(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all() and logits.shape[:2] == (1, 4)
    return loaded.prompt_encoder["default"].embedding.weight.detach()
