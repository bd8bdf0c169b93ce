"""Server-hierarchical mode: a root relaying to K=2 sub-server processes over real gRPC sockets.

The sub-servers are real processes (``fedsplit subserver``) on 127.0.0.1, loading
tiny-llama from a safetensors directory; the root relays over TLS + sealed sessions; averaging is a
gloo all-reduce. Sub-server start-up is the slow part (importing peft), so the two tests that do not
break the hierarchy share one.
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.adapters import LoraSettings, adapter_state_dict, add_part_adapters
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.client.runner import Backoff, ClientRunner, client_adapters
from fedsplit.config import HierarchyConfig, ModelConfig
from fedsplit.protocol import pb
from fedsplit.recipes.hierarchy import Hierarchy, RunIdentity, SecurityFiles, SubServerSpec, start_hierarchy
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
from fedsplit.security.identity import generate_identity, load_private_key
from fedsplit.security.signing import seal_control
from fedsplit.security.tls import load_channel_tls, load_server_tls
from fedsplit.server.checkpoint import capture_trunk, restore_trunk
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator, RunResult
from fedsplit.server.hierarchy.collectives import SyncMode, TrainableState
from fedsplit.server.hierarchy.control import ControlError, ControlOp, RootControl, SubControl
from fedsplit.split import SplitParts, split_model
from fedsplit.strategy import FedAvg
from fedsplit.train.config import TrainConfig
from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

from tiny import token_batches

RUN_ID = "hier-run"
CONFIG_HASH = hash_run_config({"model": "tiny-llama", "split": [1, 1], "mode": "hierarchical"})
CLIENTS = ["a", "b", "c", "d"]
LORA = [LoraSettings(r=2), LoraSettings(r=2), LoraSettings(r=2)]
CFG = TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=1)
FAST_BACKOFF = Backoff(base_s=0.05, max_s=0.2, max_attempts=20)


# -- arrangement helpers ---------------------------------------------------------------------------
def build_parts() -> SplitParts:
    """Tiny Llama cut 1 | 4 | 1 with LoRA on every part, seeded as the clients and the root do it."""
    from fedsplit.models import load_model

    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, LORA, seed=CFG.seed)
    return parts


@dataclass
class Keys:
    directory: Path
    root: ed25519.Ed25519PrivateKey
    clients: dict[str, ed25519.Ed25519PrivateKey]


def make_keys(directory: Path) -> Keys:
    """The server's TLS key and CA, the root's identity and one identity per client in :data:`CLIENTS`."""
    run_keygen(directory, "server", with_ca=True)
    run_keygen(directory, "root")
    return Keys(directory, load_private_key(directory / "root.key"), {c: generate_identity() for c in CLIENTS})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("hier-keys"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedsplit.models import load_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    load_model("tiny-llama")[0].save_pretrained(directory)
    return directory


def make_spec(keys: Keys, tiny_dir: Path, total_steps: int, sync_every: int) -> SubServerSpec:
    d = keys.directory
    return SubServerSpec(
        run=RunIdentity(RUN_ID, CONFIG_HASH.hex(), list(CLIENTS), total_steps),
        security=SecurityFiles(d / "server.key", d / "root.pub", d / "server-tls.key", d / "server-tls.crt",
                               d / "ca.crt"),
        model=ModelConfig(str(tiny_dir), 1, 1),
        train=CFG,
        lora_trunk=LORA[1],
        hierarchy=HierarchyConfig(subservers=2, sync_every=sync_every, threads=1, sync_timeout_s=20.0,
                                  drain_timeout_s=20.0, relay_deadline_s=30.0),
    )


def start(keys: Keys, tiny_dir: Path, directory: Path, *, total_steps: int, sync_every: int) -> Hierarchy:
    spec = make_spec(keys, tiny_dir, total_steps, sync_every)
    return start_hierarchy(spec, build_parts().trunk, keys.root, directory)


@pytest.fixture(scope="module")
def shared_hierarchy(keys: Keys, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hierarchy]:
    hierarchy = start(keys, tiny_dir, tmp_path_factory.mktemp("hier"), total_steps=64, sync_every=3)
    yield hierarchy
    hierarchy.close()


def run_federation(hierarchy: Hierarchy, keys: Keys, *, rounds: int, local_steps: int,
                   during: threading.Thread | None = None) -> tuple[RoundCoordinator, RunResult, dict]:
    """The root's gRPC server + RoundCoordinator over the router, and one ClientRunner thread per client."""
    coordinator = RoundCoordinator(
        hierarchy.router,  # type: ignore[arg-type] - the TrunkServer surface
        FedAvg(local_steps=local_steps, lr=CFG.lr, min_clients=1),
        client_adapters(*_head_tail()),
        CLIENTS,
        CoordinatorConfig(num_rounds=rounds, ordered_steps=False, round_timeout_s=120.0,
                          step_timeout_s=60.0, join_timeout_s=60.0, join_grace_s=0.5, poll_s=0.05),
        run_id=RUN_ID,
        config_hash=CONFIG_HASH.hex(),
    )
    d = keys.directory
    admitted = {c: k.public_key() for c, k in keys.clients.items()}
    verifier = HandshakeVerifier(load_private_key(d / "server.key"), admitted, [], pb.PROTOCOL_VERSION_CURRENT,
                                 CONFIG_HASH, run_id=RUN_ID)
    server = GrpcServer("127.0.0.1:0", SessionFactory(verifier, coordinator.handler_for, RUN_ID),
                        tls=load_server_tls(d / "server-tls.key", d / "server-tls.crt"),
                        on_disconnect=coordinator.on_disconnect).start()
    outcomes: dict[str, object] = {}
    threads = [threading.Thread(target=_run_client, args=(server.port, keys, i, cid, outcomes), daemon=True)
               for i, cid in enumerate(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        coordinator.start()
        if during is not None:
            during.start()
        result = coordinator.wait(120.0)
        for thread in threads:
            thread.join(30.0)
    finally:
        server.stop(0)
    return coordinator, result, outcomes


def _head_tail() -> tuple:
    parts = build_parts()
    return parts.head, parts.tail


def _run_client(port: int, keys: Keys, index: int, client_id: str, outcomes: dict) -> None:
    parts = build_parts()
    creds = ClientCredentials(keys.clients[client_id], load_private_key(keys.directory / "server.key").public_key(),
                              client_id, RUN_ID, CONFIG_HASH)
    connect = functools.partial(connect_grpc, f"127.0.0.1:{port}", creds,
                                tls=load_channel_tls(keys.directory / "ca.crt"), connect_timeout_s=5.0)
    runner = ClientRunner(client_id, parts.head, parts.tail, token_batches(4, 2, seed=100 + index), CFG, connect,
                          backoff=FAST_BACKOFF)
    try:
        outcomes[client_id] = runner.run()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        outcomes[client_id] = exc
    finally:
        runner.close()


def take_steps(hierarchy: Hierarchy, client_id: str, steps: int, seed: int) -> None:
    """``steps`` split steps of one client straight through the router (as the coordinator relays them)."""
    parts = build_parts()
    router = hierarchy.router
    channel, _ = in_process_channel(client_id,
                                    lambda kind, rnd, step, req: router.handle(client_id, kind, rnd, step, req))
    client = SplitClient(parts.head, parts.tail, channel, CFG, total_steps=64)
    client.round = 1
    for batch in token_batches(steps, 2, seed=seed):
        client.train_step([batch])


def _equal_states(x, y) -> bool:
    same = all(torch.equal(getattr(x, part)[k], getattr(y, part)[k])
               for part in ("adapters", "exp_avg", "exp_avg_sq") for k in x.adapters)
    return same and x.step == y.step and x.steps_taken == y.steps_taken


# -- the sync ----------------------------------------------------------------------------------------
def test_sync_leaves_every_replica_with_the_step_weighted_average_of_what_they_held(shared_hierarchy):
    # Arrange: a (sub-server 1) takes 2 steps, b (sub-server 2) one: weights 2/3 and 1/3 (R = 3: no auto sync)
    router = shared_hierarchy.router
    assert router.assignment == {"a": 1, "b": 2, "c": 1, "d": 2}
    take_steps(shared_hierarchy, "a", 2, seed=1)
    take_steps(shared_hierarchy, "b", 1, seed=2)
    before = router.replica_states()
    assert (before[1].steps_since, before[2].steps_since) == (2, 1)
    assert not _equal_states(before[1], before[2])  # they diverged
    weights = {1: 2 / 3, 2: 1 / 3}

    # Act
    report = router.sync()
    after = router.replica_states()

    # Assert: all ranks hold the same bytes, and those are the hand-computed weighted average
    assert report.ok and report.mode is SyncMode.AVERAGE and report.total_steps == 3
    assert _equal_states(after[1], after[2]) and _equal_states(after[0], after[1])
    for part in ("adapters", "exp_avg", "exp_avg_sq"):
        for key in before[1].adapters:
            expected = sum(w * getattr(before[r], part)[key].double() for r, w in weights.items())
            torch.testing.assert_close(getattr(after[1], part)[key].double(), expected, rtol=1e-6, atol=1e-9)
    for key in before[1].adapters:
        assert after[1].step[key] == pytest.approx(sum(w * before[r].step[key] for r, w in weights.items()), rel=1e-6)
    assert after[1].steps_taken == before[0].steps_taken + 3 == router.steps_taken
    root_adapters = adapter_state_dict(router.trunk)  # what checkpoints and exports read
    assert all(torch.equal(root_adapters[k], after[1].adapters[k]) for k in root_adapters)
    for key, param in zip(root_adapters, router.params, strict=True):
        moments = router.optimizer.state[param]
        assert torch.equal(moments["exp_avg"], after[1].exp_avg[key])
        assert torch.equal(moments["exp_avg_sq"], after[1].exp_avg_sq[key])


def test_restoring_the_roots_state_pushes_it_to_every_replica(shared_hierarchy):
    # Arrange: the state at a round start, then a step the replicas take (and the root averages in)
    router = shared_hierarchy.router
    saved = capture_trunk(router)
    take_steps(shared_hierarchy, "c", 1, seed=3)
    assert router.steps_taken == saved.steps_taken + 1

    # Act: what a failed round's roll-back (or a checkpoint restore) does, then the next sync
    restore_trunk(router, saved)
    report = router.sync()
    states = router.replica_states()

    # Assert: every rank holds exactly the restored adapter, moments and step counters
    assert report.ok and report.mode is SyncMode.PUSH
    for state in states.values():
        assert state.steps_taken == saved.steps_taken
        assert all(torch.equal(state.adapters[k], v) for k, v in saved.adapters.items())
        for index, key in enumerate(saved.adapters):
            moments = saved.optimizer["state"][index]
            assert torch.equal(state.exp_avg[key], moments["exp_avg"]) and state.step[key] == float(moments["step"])


def test_four_clients_complete_two_rounds_through_two_subservers(shared_hierarchy, keys):
    # Arrange
    router = shared_hierarchy.router
    start_steps, start_calls = router.steps_taken, router.stats.calls
    initial = {k: v.clone() for k, v in adapter_state_dict(router.trunk).items()}

    # Act
    coordinator, result, outcomes = run_federation(shared_hierarchy, keys, rounds=2, local_steps=2)

    # Assert: every client in both rounds; every step relayed; the replicas averaged (R = 3) and agree
    assert result.rounds_completed == 2
    assert [r["clients"] for r in result.history] == [CLIENTS, CLIENTS]
    assert not [c for c, o in outcomes.items() if isinstance(o, BaseException)], outcomes
    assert router.stats.calls - start_calls == 2 * 2 * len(CLIENTS) * 3
    assert router.steps_taken == start_steps + 16
    assert any(r.mode is SyncMode.AVERAGE and r.total_steps >= 3 for r in router.reports)
    states = router.replica_states()
    assert _equal_states(states[0], states[1]) and _equal_states(states[1], states[2])
    moved = max(float((result.trunk_adapters[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4
    assert all(torch.equal(result.trunk_adapters[k], states[1].adapters[k]) for k in initial)


# -- a sub-server dies ---------------------------------------------------------------------------------
def test_a_killed_subserver_is_detected_its_clients_move_and_the_run_completes(keys, tiny_dir, tmp_path):
    # Arrange: its own hierarchy; sub-server 2 gets SIGKILL once 12 requests were relayed (round 1)
    hierarchy = start(keys, tiny_dir, tmp_path, total_steps=24, sync_every=2)
    router = hierarchy.router
    victim = hierarchy.processes[2].process

    def kill_mid_run() -> None:
        while router.stats.calls < 12:
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)

    try:
        # Act
        coordinator, result, outcomes = run_federation(hierarchy, keys, rounds=2, local_steps=3,
                                                       during=threading.Thread(target=kill_mid_run, daemon=True))
        states = router.replica_states()
    finally:
        hierarchy.close()

    # Assert: detected, b and d moved to sub-server 1, the group re-formed without 2, both rounds done
    assert victim.wait(5) == -signal.SIGKILL
    [failure] = router.failures
    assert failure.rank == 2 and failure.moved == {"b": 1, "d": 1}
    assert router.assignment == {c: 1 for c in CLIENTS} and router.live_replicas == [1]
    assert result.rounds_completed == 2 and result.history[-1]["clients"] == CLIENTS
    assert router.generation >= 2 and router.reports[-1].members == (1,)
    assert set(states) == {0, 1} and _equal_states(states[0], states[1])
    assert not [c for c, o in outcomes.items() if isinstance(o, BaseException)], outcomes


# -- the control plane, without processes --------------------------------------------------------------
def test_control_messages_are_signed_bound_to_the_root_and_read_in_order():
    # Arrange: a control store on loopback, the root and one sub-server end
    from torch.distributed import TCPStore

    root_key, server_key = generate_identity(), generate_identity()
    root = RootControl.listen("127.0.0.1", 0, RUN_ID, root_key, server_key.public_key(), timeout_s=5.0)
    sub = SubControl.connect("127.0.0.1", root.port, RUN_ID, 1, server_key, root_key.public_key(), timeout_s=5.0)
    forger = TCPStore("127.0.0.1", root.port, is_master=False, timeout=datetime.timedelta(seconds=5))

    # Act / Assert: an honest message arrives intact and in order
    sent = root.post(ControlOp.SYNC, 1, mode="average")
    assert sub.next(1.0) == sent and sub.next(0.1) is None
    # a message signed with another key is refused
    forged = seal_control(generate_identity(), b"root\x00",
                          {**sent.body(), "seq": 2, "run": RUN_ID, "nonce": root.nonce})
    forger.set(f"fedsplit/{RUN_ID}/ctl/2", forged)
    with pytest.raises(ControlError, match="bad signature"):
        sub.next(1.0)
    # a genuine old message replayed under a new sequence number is refused
    forger.set(f"fedsplit/{RUN_ID}/ctl/2", forger.get(f"fedsplit/{RUN_ID}/ctl/1"))
    with pytest.raises(ControlError, match="holds message 1"):
        sub.next(1.0)


def test_trainable_state_round_trips_through_its_flat_vector():
    # Arrange: a trunk whose AdamW took one step
    parts = build_parts()
    trunk = parts.trunk
    params = [p for p in trunk.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    state = TrainableState(trunk, params, optimizer)
    flat = state.flatten()

    # Act
    state.load(flat * 2)
    doubled = state.unflatten(state.flatten(), 7, 1)

    # Assert
    assert flat.dtype == torch.float64 and flat.numel() == state.numel
    original = state.unflatten(flat, 7, 1)
    for key, value in original.adapters.items():
        assert torch.equal(doubled.adapters[key], value * 2)
        assert torch.equal(doubled.exp_avg_sq[key], original.exp_avg_sq[key] * 2)
        assert doubled.step[key] == 2 * original.step[key] == 2.0
    assert list(original.adapters) == list(adapter_state_dict(trunk))
