"""Server-hierarchical mode with P-tuning v2 prefixes: K=2 sub-server processes whose trunk replicas
train the trunk prefixes (FL-GLM, arXiv 2406.14898, Sec. 3.3; docs/ptuning.md).

The harness is :mod:`.test_hierarchical`'s (real ``fedsplit subserver`` processes on 127.0.0.1, TLS +
sealed relay sessions, gloo all-reduce); here the spec says ``method.name = "prefix"`` and every part
carries ``P = 3`` prefixes seeded as the network recipes seed them (part ``i``: ``seed + i``). One
hierarchy with ``sync_every = 1`` serves both tests (sub-server start-up is the slow part).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedsplit.adapters import adapter_state_dict
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.client.runner import client_adapters
from fedsplit.config import HierarchyConfig, MethodConfig, ModelConfig
from fedsplit.recipes.hierarchy import Hierarchy, RunIdentity, SecurityFiles, SubServerSpec, start_hierarchy
from fedsplit.server import TrunkServer
from fedsplit.server.checkpoint import (
    Checkpoint,
    capture_rng,
    capture_trunk,
    load_checkpoint,
    restore_trunk,
    save_checkpoint,
)
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator
from fedsplit.server.hierarchy.collectives import SyncMode
from fedsplit.split import SplitParts, split_model
from fedsplit.split.prefix import add_part_prefixes, part_prefix
from fedsplit.strategy import FedAvg
from fedsplit.train.config import TrainConfig

from .test_hierarchical import CLIENTS, CONFIG_HASH, RUN_ID, Keys, make_keys
from tiny import token_batches

P = 3  # virtual tokens per block
CFG = TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=1)
TOTAL_STEPS = 64


def build_prefix_parts() -> SplitParts:
    """Tiny Llama cut 1 | 4 | 1 with P prefixes on every part, seeded as build_prefix_parts seeds them."""
    from fedsplit.models import load_model

    parts = split_model(load_model("tiny-llama")[0], 1, 1)
    add_part_prefixes(parts, P, seed=CFG.seed)
    return parts


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("hier-prefix-keys"))


@pytest.fixture(scope="module")
def hierarchy(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hierarchy]:
    """K=2 prefix replicas averaged after every optimizer step; no LR scaling (so K replicas = one trunk)."""
    from fedsplit.models import load_model

    tiny_dir = tmp_path_factory.mktemp("tiny-llama")
    load_model("tiny-llama")[0].save_pretrained(tiny_dir)  # the replicas memory-map it
    d = keys.directory
    spec = SubServerSpec(
        run=RunIdentity(RUN_ID, CONFIG_HASH.hex(), list(CLIENTS), TOTAL_STEPS),
        security=SecurityFiles(d / "server.key", d / "root.pub", d / "server-tls.key", d / "server-tls.crt",
                               d / "ca.crt"),
        model=ModelConfig(str(tiny_dir), 1, 1),
        train=CFG,
        hierarchy=HierarchyConfig(subservers=2, sync_every=1, threads=1, sync_timeout_s=20.0, drain_timeout_s=20.0,
                                  relay_deadline_s=30.0, scale_lr=False),
        method=MethodConfig(name="prefix", num_virtual_tokens=P),
    )
    started = start_hierarchy(spec, build_prefix_parts().trunk, keys.root, tmp_path_factory.mktemp("hier-prefix"))
    yield started
    started.close()


def _client(parts: SplitParts, handle) -> SplitClient:  # handle(client_id, kind, round, step, request)
    channel, _ = in_process_channel("x", lambda kind, rnd, step, req: handle(kind, rnd, step, req))
    client = SplitClient(parts.head, parts.tail, channel, CFG, total_steps=TOTAL_STEPS)
    client.round = 1
    return client


def _trunk_prefixes(states: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in states.items() if "prefix_tuning." in k}


def _settle(router) -> None:
    """Wait until the sync the last step asked for (sync_every = 1) has run: no sync due, the gate open."""
    from fedsplit.server.hierarchy.router import GateStage

    with router._cond:
        assert router._cond.wait_for(lambda: router._due is None and router._gate is GateStage.OPEN, timeout=60.0)


# -- (a) replicas averaged after every step = one sequential trunk ----------------------------------
@pytest.mark.slow  # the first user of the hierarchy pays its start-up (~15-25 s: two sub-server processes)
def test_replicas_synced_every_step_train_the_trunk_prefixes_as_one_sequential_trunk(hierarchy):
    # Arrange: clients a (sub-server 1) and b (sub-server 2) alternate steps on their own batches; the
    # reference is one TrunkServer taking the same steps in the same order (sequential mode), starting
    # from the replicas' state (the seeded prefixes, or wherever the other test left them)
    router = hierarchy.router
    assert router.assignment["a"] == 1 and router.assignment["b"] == 2
    _settle(router)
    reference = TrunkServer(build_prefix_parts().trunk, CFG, TOTAL_STEPS)
    restore_trunk(reference, capture_trunk(router))
    initial, first_report, start_steps = adapter_state_dict(reference.trunk), len(router.reports), router.steps_taken
    assert set(initial) == set(adapter_state_dict(router.trunk)) and all("prefix_tuning." in k for k in initial)
    batches = {cid: token_batches(3, 2, seed=40 + i) for i, cid in enumerate(("a", "b"))}
    hier = {cid: _client(build_prefix_parts(), lambda *m, c=cid: router.handle(c, *m)) for cid in ("a", "b")}
    seq = {cid: _client(build_prefix_parts(), lambda *m, c=cid: reference.handle(c, *m)) for cid in ("a", "b")}

    # Act
    for step in range(3):
        for cid in ("a", "b"):
            hier[cid].train_step([batches[cid][step]])
            seq[cid].train_step([batches[cid][step]])
    _settle(router)
    states = router.replica_states()

    # Assert: every sync averaged one replica's step (weights 1 and 0), and every rank holds the state
    # the sequential trunk reached: its prefixes, AdamW moments and step counters.
    # Tolerance: with weights 1 and 0 the float64 average is exact, so the only difference left is the
    # replica computing the trunk's forward/backward in another process (1 thread vs this test's
    # threads): BLAS reductions may differ in the last float32 bits. rtol 1e-5 / atol 1e-6 allows that
    # and nothing else (the prefixes moved by ~1e-2 per step: lr 1e-2, AdamW's normalized update). On
    # the development machine the difference was exactly 0.0 (prefixes moved up to 0.053).
    syncs = router.reports[first_report:]
    assert all(r.ok for r in syncs) and [r.total_steps for r in syncs if r.mode is SyncMode.AVERAGE] == [1] * 6
    expected = adapter_state_dict(reference.trunk)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3
    for rank, state in states.items():
        assert state.steps_taken == reference.steps_taken == start_steps + 6, rank
        for index, (key, value) in enumerate(expected.items()):
            torch.testing.assert_close(state.adapters[key], value, rtol=1e-5, atol=1e-6)
            moments = reference.optimizer.state_dict()["state"][index]
            torch.testing.assert_close(state.exp_avg[key], moments["exp_avg"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state.exp_avg_sq[key], moments["exp_avg_sq"], rtol=1e-5, atol=1e-9)
            assert state.step[key] == float(moments["step"])
    for cid in ("a", "b"):  # the gradients the clients got back were the sequential trunk's too
        ours, theirs = client_adapters(hier[cid].head, hier[cid].tail), client_adapters(seq[cid].head, seq[cid].tail)
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


# -- (c) resume: a checkpoint's trunk prefixes reach every replica ----------------------------------
@pytest.mark.slow  # needs the hierarchy (~15-25 s to start when run alone)
def test_resuming_from_a_checkpoint_restores_every_replicas_trunk_prefixes_and_moments(hierarchy, tmp_path: Path):
    # Arrange: a checkpoint of the root's (averaged) state, then steps that move the replicas away from it
    router = hierarchy.router
    head_tail = build_prefix_parts()
    global_adapters = client_adapters(head_tail.head, head_tail.tail)
    step_before = _client(build_prefix_parts(), lambda *m: router.handle("c", *m))
    step_before.train_step([token_batches(1, 2, seed=7)[0]])  # the optimizer has moments to save
    _settle(router)
    saved = Checkpoint(round=1, run_id=RUN_ID, config_hash=CONFIG_HASH.hex(), global_adapters=global_adapters,
                       trunk=capture_trunk(router), client_steps={"c": 1}, rng=capture_rng(), round_clients=("c",))
    path = save_checkpoint(tmp_path / "checkpoints", saved)
    later = _client(build_prefix_parts(), lambda *m: router.handle("d", *m))
    for batch in token_batches(2, 2, seed=8):
        later.train_step([batch])
    _settle(router)
    moved = router.replica_states()[2].adapters
    assert not all(torch.equal(moved[k], v) for k, v in saved.trunk.adapters.items())

    # Act: what ``fedsplit server --resume`` does (coordinator.restore), then the next sync
    coordinator = RoundCoordinator(router, FedAvg(local_steps=1, lr=CFG.lr, min_clients=1),  # type: ignore[arg-type]
                                   global_adapters, CLIENTS, CoordinatorConfig(num_rounds=2), run_id=RUN_ID,
                                   config_hash=CONFIG_HASH.hex())
    restored = load_checkpoint(path)
    coordinator.restore(restored)
    report = router.sync()
    states = router.replica_states()

    # Assert: the root pushed the checkpoint's state; every rank holds its prefixes bit for bit
    assert report.ok and report.mode is SyncMode.PUSH
    assert _trunk_prefixes(restored.trunk.adapters).keys() == saved.trunk.adapters.keys()
    for rank, state in states.items():
        assert state.steps_taken == saved.trunk.steps_taken, rank
        for index, (key, value) in enumerate(saved.trunk.adapters.items()):
            assert torch.equal(state.adapters[key], value), (rank, key)
            moments = saved.trunk.optimizer["state"][index]
            assert torch.equal(state.exp_avg[key], moments["exp_avg"]) and torch.equal(
                state.exp_avg_sq[key], moments["exp_avg_sq"])
            assert state.step[key] == float(moments["step"])
    assert part_prefix(router.trunk) is not None


def test_a_replica_spec_round_trips_its_method_through_the_spec_file(tmp_path: Path):
    from fedsplit.recipes.hierarchy import read_spec, write_spec
    from fedsplit.recipes.subserver import build_replica_trunk

    d = tmp_path
    spec = SubServerSpec(run=RunIdentity(RUN_ID, CONFIG_HASH.hex(), ["a"], 4),
                         security=SecurityFiles(d / "server.key", d / "root.pub", insecure=True),
                         model=ModelConfig("tiny-llama", 1, 1), train=CFG,
                         hierarchy=HierarchyConfig(subservers=1, shared_weights=False),
                         method=MethodConfig(name="prefix", num_virtual_tokens=P))

    read = read_spec(write_spec(d / "hierarchy.toml", spec))
    trunk = build_replica_trunk(read)

    assert read.method == spec.method
    ours, root = adapter_state_dict(trunk), adapter_state_dict(build_prefix_parts().trunk)
    assert ours.keys() == root.keys() and all(torch.equal(ours[k], root[k]) for k in ours)  # seed + 1, as the root
    trainable = [n for n, p in trunk.named_parameters() if p.requires_grad]
    assert trainable == [f"prefix_tuning.{w}.{i}" for w in ("key", "value") for i in trunk.layer_indices]
    lora = build_replica_trunk(replace(read, method=MethodConfig()))
    assert part_prefix(lora) is None and any("lora_" in k for k in adapter_state_dict(lora))


def test_a_replica_built_with_another_method_refuses_the_roots_group_naming_the_method_section():
    from fedsplit.adapters import LoraSettings, add_lora
    from fedsplit.models import load_model
    from fedsplit.server.hierarchy.collectives import TrainableState
    from fedsplit.server.hierarchy.control import ControlMessage, ControlOp
    from fedsplit.server.hierarchy.replica import SubServer, SubServerStage

    # Arrange: the root trains prefixes; this replica was started from a spec that says LoRA
    root = TrunkServer(build_prefix_parts().trunk, CFG, TOTAL_STEPS)
    lora_trunk = split_model(load_model("tiny-llama")[0], 1, 1).trunk
    add_lora(lora_trunk, LoraSettings(r=2), seed=CFG.seed + 1)
    replica = SubServer(1, TrunkServer(lora_trunk, CFG, TOTAL_STEPS))
    layout = TrainableState(root.trunk, root.params, root.optimizer).layout
    form = ControlMessage(1, ControlOp.FORM, 1, members=(1,), host="127.0.0.1", port=1, timeout_s=1.0,
                          layout=layout)

    # Act
    result = replica.apply(form)

    # Assert: refused before any process group is joined, the error naming the spec sections to fix
    assert not result.ok and "[method]" in result.error and replica.stage is SubServerStage.STARTING
