"""Test helpers: an in-process federation for the round coordinator (tiny models and batches: ``tiny``).

Every client session is a real :class:`fedsplit.channel.Channel` over an in-process transport (the
frames are bytes, as on the network). ``Recorder`` keeps what went over the wire so tests can
recompute the aggregate; ``DroppingTransport`` breaks a session the way a lost connection does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from fedsplit.channel import Channel, Handler, InProcessTransport, RemoteError, ServerSession
from fedsplit.client.runner import Backoff, ClientRunner, RunnerResult, client_adapters
from fedsplit.metrics import MetricsWriter
from fedsplit.protocol import decode_named, pb
from fedsplit.server import TrunkServer
from fedsplit.server.coordinator import CoordinatorConfig, RoundCoordinator, RunResult, TrunkService
from fedsplit.server.evaluation import FederatedEvalConfig
from fedsplit.split import SplitParts
from fedsplit.strategy import FedAvg
from fedsplit.train.config import TrainConfig

from tiny import build_model, token_batches

FAST_BACKOFF = Backoff(base_s=0.01, max_s=0.05, max_attempts=20)


@dataclass
class Recorder:
    """Wraps session handlers; keeps accepted updates and the round plans handed out."""

    updates: dict[tuple[int, str], tuple[dict[str, Tensor], int]] = field(default_factory=dict)
    plans: dict[tuple[int, str], dict[str, Tensor]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, client_id: str, handler: Handler) -> Handler:
        def handle(kind, round, step, request):
            reply = handler(kind, round, step, request)
            with self._lock:
                if kind == pb.CLIENT_UPDATE:
                    tensors = decode_named(request.adapters, "update")
                    self.updates[(request.round, client_id)] = (tensors, int(request.num_examples))
                if kind == pb.JOIN_ROUND and reply.local_steps:
                    self.plans[(reply.round, client_id)] = decode_named(reply.adapters, "plan")
            return reply

        return handle

    def round_updates(self, round: int) -> dict[str, tuple[dict[str, Tensor], int]]:
        return {cid: value for (r, cid), value in self.updates.items() if r == round}


def join_until_plan(channel: Channel, timeout_s: float = 30.0) -> pb.RoundPlan:
    """JOIN_ROUND until the server hands out a plan (or says the run is finished)."""
    deadline = time.monotonic() + timeout_s
    while True:
        plan = channel.call(pb.JOIN_ROUND, pb.JoinRound())
        if plan.local_steps or plan.finished:
            return plan
        if time.monotonic() > deadline:
            raise TimeoutError(f"no round plan within {timeout_s} s")
        time.sleep(plan.wait_s)


def weighted_mean(updates: dict[str, tuple[dict[str, Tensor], int]]) -> dict[str, Tensor]:
    """The FedAvg target, recomputed independently: sum_i n_i x_i / sum_i n_i in float64."""
    total = sum(n for _, n in updates.values())
    keys = next(iter(updates.values()))[0]
    return {k: sum(t[k].double() * n for t, n in updates.values()) / total for k in keys}


class DroppingTransport:
    """An in-process transport whose connection breaks once ``drop(kind, count)`` says so.

    The server has already processed the frame that breaks the connection (the reply is lost on
    the way back), then the server sees the stream end: ``on_disconnect`` runs, as the gRPC
    server does it.
    """

    def __init__(
        self, session: ServerSession, drop: Callable[[int, int], bool], on_disconnect: Callable[[], None]
    ) -> None:
        self.inner = InProcessTransport(session)
        self.drop, self.on_disconnect = drop, on_disconnect
        self.counts: dict[int, int] = {}
        self.broken = False

    def exchange(self, frame: bytes) -> bytes:
        if self.broken:
            raise ConnectionError("connection closed")
        kind = pb.Frame.FromString(frame).kind
        self.counts[kind] = self.counts.get(kind, 0) + 1
        reply = self.inner.exchange(frame)
        if self.drop(kind, self.counts[kind]):
            self.broken = True
            self.on_disconnect()
            raise ConnectionError(f"connection reset after {pb.Kind.Name(kind)} #{self.counts[kind]}")
        return reply

    def close(self) -> None:
        self.broken = True


DropRule = Callable[[int, int, int], bool]  # (session number, kind, count of that kind) -> drop now?


@dataclass
class Federation:
    coordinator: RoundCoordinator
    runners: dict[str, ClientRunner]
    recorder: Recorder
    server: SplitParts
    initial_trunk: dict[str, Tensor]
    outcomes: dict[str, RunnerResult | BaseException] = field(default_factory=dict)

    def connector(self, client_id: str, drop: DropRule | None = None) -> Callable[[], Channel]:
        sessions = [0]

        def connect() -> Channel:
            sessions[0] += 1
            number = sessions[0]
            handler = self.recorder.wrap(client_id, self.coordinator.handler_for(client_id))
            session = ServerSession(client_id, handler)
            if drop is None:
                return Channel(InProcessTransport(session))
            rule = lambda kind, count: drop(number, kind, count)  # noqa: E731
            return Channel(DroppingTransport(session, rule, lambda: self.coordinator.on_disconnect(client_id)))

        return connect

    def start_clients(self, runners: Sequence[ClientRunner] | None = None) -> list[threading.Thread]:
        threads = []
        for runner in runners if runners is not None else self.runners.values():
            thread = threading.Thread(target=self._run_client, args=(runner,), daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _run_client(self, runner: ClientRunner) -> None:
        try:
            self.outcomes[runner.client_id] = runner.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.outcomes[runner.client_id] = exc

    def run(self, timeout: float = 60.0) -> RunResult:
        """Run the coordinator and every client to the end; raise a client's error if it had one."""
        threads = self.start_clients()
        self.coordinator.start()
        result = self.coordinator.wait(timeout)
        for thread in threads:
            thread.join(timeout)
        errors = {cid: out for cid, out in self.outcomes.items() if isinstance(out, BaseException)}
        if errors:
            raise AssertionError(f"clients failed: {errors}") from next(iter(errors.values()))
        return result

    def run_probing(self, probe: Callable[[], None]) -> list[str]:
        """:meth:`run`, while another thread calls ``probe`` over and over; the refusals it got."""
        refused: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    probe()
                except RemoteError as exc:
                    refused.append(str(exc))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self.run()
        finally:
            stop.set()
            watcher.join(10)
        return refused


def make_federation(
    client_ids: Sequence[str],
    *,
    num_rounds: int,
    local_steps: int,
    cfg: TrainConfig | None = None,
    batch_sizes: dict[str, int] | None = None,
    num_batches: int = 4,
    min_clients: int = 1,
    drops: dict[str, DropRule] | None = None,
    runners_for: Sequence[str] | None = None,
    checkpoint_dir: Path | None = None,
    metrics: MetricsWriter | None = None,
    trunk_server: Callable[..., TrunkService] | None = None,
    evaluation: FederatedEvalConfig | None = None,
    **config: float,
) -> Federation:
    """Server + coordinator + one ClientRunner per id in ``runners_for`` (default: every client)."""
    cfg = cfg or TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=1)
    _, server = build_model()
    steps = num_rounds * local_steps * len(client_ids)
    if trunk_server is None:
        trunk = TrunkServer(server.trunk, cfg, total_steps=steps, lease_timeout_s=5.0)  # a stuck lease fails fast
    else:
        trunk = trunk_server(server.trunk, cfg, steps)
    settings = dict(round_timeout_s=60.0, step_timeout_s=10.0, join_timeout_s=30.0, join_grace_s=0.5, poll_s=0.01)
    settings.update(config)
    coordinator = RoundCoordinator(
        trunk,
        FedAvg(local_steps=local_steps, lr=cfg.lr, min_clients=min_clients),
        client_adapters(server.head, server.tail),
        list(client_ids),
        CoordinatorConfig(num_rounds=num_rounds, **settings),
        metrics=metrics,
        checkpoint_dir=checkpoint_dir,
        run_id="test-run",
        config_hash="0" * 64,
        evaluation=evaluation,
    )
    fed = Federation(
        coordinator, {}, Recorder(), server, {k: v.clone() for k, v in coordinator.trunk_adapters().items()}
    )
    sizes = batch_sizes or {}
    for index, cid in enumerate(runners_for if runners_for is not None else client_ids):
        _, parts = build_model()
        batches = token_batches(num_batches, sizes.get(cid, 2), seed=100 + index)
        connect = fed.connector(cid, (drops or {}).get(cid))
        fed.runners[cid] = ClientRunner(cid, parts.head, parts.tail, batches, cfg, connect, backoff=FAST_BACKOFF)
    return fed
