"""Test helpers: a private-aggregation federation over real loopback gRPC (TLS + sealed frames).

One :class:`RoundCoordinator` whose strategy is a :class:`PrivateAggregator`, served by a
:class:`GrpcServer` on 127.0.0.1:0, and one :class:`ClientRunner` per client dialing it with its own
Ed25519 identity and a :class:`RecordingUpdate` (a :class:`PrivateUpdate` that keeps what the client
trained, so a test can recompute plaintext FedAvg; subclasses misbehave on purpose).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedsplit.channel import Channel
from fedsplit.client.private_update import PrivateUpdate
from fedsplit.client.runner import ClientRunner, client_adapters
from fedsplit.config import AggregationConfig
from fedsplit.protocol import decode_named, pb
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.handshake import HandshakeVerifier, hash_run_config
from fedsplit.security.identity import generate_identity, load_private_key
from fedsplit.security.tls import load_channel_tls, load_server_tls
from fedsplit.server import TrunkServer
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator, RunResult
from fedsplit.server.private_round import PrivateAggregator
from fedsplit.strategy import FedAvg, Strategy
from fedsplit.train.config import TrainConfig
from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

from .federation import FAST_BACKOFF, build_model, token_batches

RUN_ID = "private-run"
CONFIG_HASH = hash_run_config({"model": "tiny-llama", "split": [1, 1]})


class RecordingUpdate(PrivateUpdate):
    """Keeps each round's full adapters (before any masking) for the test's FedAvg target."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained: dict[int, dict[str, Tensor]] = {}

    def submit(self, channel: Channel, plan: pb.RoundPlan, update: pb.ClientUpdate, data_report: int) -> None:
        self.trained[plan.round] = decode_named(update.adapters, "update")
        super().submit(channel, plan, update, data_report)


@dataclass
class PrivateFederation:
    coordinator: RoundCoordinator
    server: GrpcServer
    runners: dict[str, ClientRunner]
    privates: dict[str, RecordingUpdate]
    reports: dict[str, int]
    initial: dict[str, Tensor]
    identities: dict[str, Any]
    outcomes: dict[str, Any] = field(default_factory=dict)
    address: str = ""  # where the clients dial (looked up at every connect: a restarted server may move)

    def start_clients(self) -> list[Any]:
        """Every client runner in its own (daemon) thread; each one's outcome lands in ``outcomes``."""
        import threading

        def run_client(runner: ClientRunner) -> None:
            try:
                self.outcomes[runner.client_id] = runner.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.outcomes[runner.client_id] = exc

        threads = [threading.Thread(target=run_client, args=(r,), daemon=True) for r in self.runners.values()]
        for thread in threads:
            thread.start()
        return threads

    def run(self, timeout: float = 60.0) -> RunResult:
        threads = self.start_clients()
        try:
            return self.coordinator.start().wait(timeout)
        finally:
            for thread in threads:
                thread.join(timeout)
            for runner in self.runners.values():
                runner.close()
            self.server.stop(0)

    def fedavg(self, round: int, clients: Sequence[str]) -> dict[str, Tensor]:
        """Plaintext FedAvg (float64) of what ``clients`` trained in ``round``, weighted by their data reports."""
        total = sum(self.reports[c] for c in clients)
        keys = self.privates[clients[0]].trained[round]
        return {k: sum(self.privates[c].trained[round][k].double() * self.reports[c] for c in clients) / total
                for k in keys}


def make_private_federation(
    tmp_path: Path,
    agg: AggregationConfig,
    client_ids: Sequence[str],
    *,
    batch_sizes: dict[str, int] | None = None,
    update_cls: dict[str, Callable[..., RecordingUpdate]] | None = None,
    strategy: Callable[[FedAvg], Strategy] | None = None,
    num_rounds: int = 1,
    phase_timeout_s: float = 5.0,
    identities: dict[str, Any] | None = None,
    privates: dict[str, RecordingUpdate] | None = None,
    checkpoint_dir: Path | None = None,
    **config: Any,
) -> PrivateFederation:
    """``identities`` and ``privates``: the clients of an earlier federation (a restarted server, same clients)."""
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0)
    keys = tmp_path / "keys"
    if not (keys / "server.key").exists():
        run_keygen(keys, "server", with_ca=True)
    identities = identities or {cid: generate_identity() for cid in client_ids}
    publics = {cid: key.public_key() for cid, key in identities.items()}
    _, server_parts = build_model()
    trunk = TrunkServer(server_parts.trunk, cfg, total_steps=num_rounds * len(client_ids), lease_timeout_s=5.0)
    inner = FedAvg(local_steps=1, lr=cfg.lr, min_clients=1)
    wrapped = strategy(inner) if strategy is not None else inner
    aggregator = PrivateAggregator(wrapped, agg, publics, run_id=RUN_ID, phase_timeout_s=phase_timeout_s, poll_s=0.02)
    settings: dict[str, Any] = dict(round_timeout_s=60.0, step_timeout_s=10.0, join_timeout_s=30.0, join_grace_s=0.5,
                                    poll_s=0.02, max_round_retries=0)
    settings.update(config)
    initial = client_adapters(server_parts.head, server_parts.tail)
    coordinator = RoundCoordinator(trunk, aggregator, initial, list(client_ids),
                                   CoordinatorConfig(num_rounds=num_rounds, **settings), run_id=RUN_ID,
                                   config_hash=CONFIG_HASH.hex(), checkpoint_dir=checkpoint_dir)
    verifier = HandshakeVerifier(load_private_key(keys / "server.key"), publics, [], pb.PROTOCOL_VERSION_CURRENT,
                                 CONFIG_HASH, run_id=RUN_ID)
    server = GrpcServer("127.0.0.1:0", SessionFactory(verifier, coordinator.handler_for, RUN_ID),
                        tls=load_server_tls(keys / "server-tls.key", keys / "server-tls.crt"),
                        max_streams=4 * len(client_ids), on_disconnect=coordinator.on_disconnect).start()
    tls = load_channel_tls(keys / "ca.crt")
    server_key = load_private_key(keys / "server.key").public_key()
    fed = PrivateFederation(coordinator, server, {}, {}, {}, {k: v.clone() for k, v in initial.items()}, identities,
                            address=f"127.0.0.1:{server.port}")
    for index, cid in enumerate(client_ids):
        _, parts = build_model()
        batches = token_batches(2, (batch_sizes or {}).get(cid, 2), seed=100 + index)
        creds = ClientCredentials(identity=identities[cid], server_key=server_key, client_id=cid, run_id=RUN_ID,
                                  config_hash=CONFIG_HASH)

        def connect(creds: ClientCredentials = creds) -> Channel:
            return connect_grpc(fed.address, creds, tls=tls, connect_timeout_s=5.0)

        make = (update_cls or {}).get(cid, RecordingUpdate)
        private = (privates or {}).get(cid) or make(cid, agg, identities[cid], publics, run_id=RUN_ID, max_wait_s=30.0)
        runner = ClientRunner(cid, parts.head, parts.tail, batches, cfg, connect, backoff=FAST_BACKOFF, private=private)
        fed.runners[cid], fed.privates[cid], fed.reports[cid] = runner, private, runner.num_examples
    return fed
