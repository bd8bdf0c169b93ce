"""What the sync and async round drivers share: stopping, running in a background thread, the
read-only view of their state, resuming from a checkpoint, and the session plumbing every request
goes through (:class:`~fedsplit.server.coordinator.RoundCoordinator`,
:class:`~fedsplit.server.async_rounds.AsyncCoordinator`)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from google.protobuf.message import Message
from torch import Tensor

from fedsplit.adapters import adapter_state_dict
from fedsplit.channel import Handler
from fedsplit.protocol import ProtocolError, encode_named, kind_name, pb
from fedsplit.server.checkpoint import Checkpoint, restore_rng, restore_trunk
from fedsplit.server.data_reports import announce_data_report, read_data_report
from fedsplit.server.evaluation import FederatedEvalConfig, RoundEvaluation
from fedsplit.server.rounds import (
    RoundStage,
    RunResult,
    RunStoppedError,
    Session,
    check_checkpoint,
    record_data_report,
)


class RunDriver:
    """The state, session plumbing and resume both coordinators share. A coordinator's ``__init__`` calls
    :meth:`_setup` first; it implements :meth:`run`, :meth:`_plan` (JOIN_ROUND while the run goes on),
    :meth:`_session_lost`, :meth:`_receive_update` and :meth:`_serve_trunk`, and may extend :meth:`_restored`."""

    _thread_name = "coordinator"
    _cond: threading.Condition
    _stopping: bool
    _thread: threading.Thread | None
    _error: BaseException | None
    _stage: RoundStage
    _global: dict[str, Tensor]
    _client_steps: dict[str, int]
    trunk: Any
    completed_round: int
    history: list[dict]
    config: Any
    _sessions: dict[str, Session]
    _serve: dict[int, Callable[[str, int, int, int, Any], Message]]
    _evaluation: RoundEvaluation
    _data_reports: dict[str, int]
    _started: bool
    _trunk_calls: int
    generation: Any
    metrics: Any
    strategy: Any
    clients: tuple[str, ...]
    checkpoint_dir: Path | None
    run_id: str
    config_hash: str

    def _setup(self, trunk: Any, strategy: Any, global_adapters: Mapping[str, Tensor], clients: Sequence[str],
               config: Any, *, metrics: Any, checkpoint_dir: Path | str | None, run_id: str, config_hash: str,
               evaluation: FederatedEvalConfig | None) -> None:
        """Check what every driver is given and set up the state they share (``__init__`` calls this first)."""
        if not global_adapters:
            raise ValueError("global_adapters: expected the clients' head/tail adapter tensors, got none")
        if not clients or len(set(clients)) != len(clients):
            raise ValueError(f"clients: expected unique client ids, got {list(clients)}")
        self.trunk, self.strategy, self.config = trunk, strategy, config
        self.clients = tuple(clients)
        self.metrics = metrics
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.run_id, self.config_hash = run_id, config_hash
        self.completed_round = 0
        self.history = []
        self.generation = None  # a server.generation.GenerationService: split generation when the trunk is idle
        self._global = {k: v.detach().clone() for k, v in global_adapters.items()}
        self._client_steps = {cid: 0 for cid in self.clients}
        self._data_reports = {}  # examples each client declared at its first join: its weight
        self._stage = RoundStage.WAITING_FOR_CLIENTS
        self._sessions = {cid: Session() for cid in self.clients}
        self._trunk_calls = 0
        self._error = None
        self._stopping = False
        self._thread = None
        self._started = False
        # One reentrant lock for the mutable state: handlers run in one thread per session.
        self._cond = threading.Condition()
        self._evaluation = RoundEvaluation(evaluation or FederatedEvalConfig(), self._cond, self._log,
                                           eval_burst=config.eval_burst, eval_per_s=config.eval_per_s)
        self._serve = {
            pb.JOIN_ROUND: self._join,
            pb.CLIENT_UPDATE: self._receive_update,
            pb.FORWARD: self._serve_trunk,
            pb.BACKWARD: self._serve_trunk,
            pb.OPTIMIZER_STEP: self._serve_trunk,
            pb.EVAL_REPORT: self._receive_eval,
            pb.GENERATE_PREFILL: self._serve_generation,
            pb.GENERATE_STEP: self._serve_generation,
            pb.GENERATE_END: self._serve_generation,
        }

    def run(self) -> RunResult:
        raise NotImplementedError

    def _receive_update(self, client_id: str, kind: int, round: int, step: int, request: Any) -> Message:
        raise NotImplementedError

    def _serve_trunk(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        raise NotImplementedError

    def stop(self) -> None:
        """End the run now (e.g. on SIGTERM): the work in progress is dropped, the last checkpoint stays."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _check_not_stopping(self) -> None:
        if self._stopping:
            raise RunStoppedError(f"stopped after round {self.completed_round} of {self.config.num_rounds}")

    # -- background driving -------------------------------------------------------------------
    def start(self) -> Self:
        """Run in a background thread; :meth:`wait` for the result."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start: already started")
        self._thread = threading.Thread(target=self._run_quietly, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def _run_quietly(self) -> None:
        with contextlib.suppress(BaseException):  # kept in self._error, re-raised by wait()
            self.run()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the background run ends; re-raise its error."""
        if self._thread is None:
            raise RuntimeError(f"{type(self).__name__}.wait: call start() first")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the run did not finish within {timeout} s (stage {self._stage.name})")
        if self._error is not None:
            raise self._error
        return self.result()

    # -- state ----------------------------------------------------------------------------------
    @property
    def stage(self) -> RoundStage:
        return self._stage

    @property
    def global_adapters(self) -> dict[str, Tensor]:
        with self._cond:
            return {k: v.clone() for k, v in self._global.items()}

    @property
    def client_steps(self) -> dict[str, int]:
        with self._cond:
            return dict(self._client_steps)

    def trunk_adapters(self) -> dict[str, Tensor]:
        return adapter_state_dict(self.trunk.trunk)

    def result(self) -> RunResult:
        return RunResult(self.completed_round, self.global_adapters, self.trunk_adapters(), list(self.history))

    # -- resuming -------------------------------------------------------------------------------
    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue a run from ``checkpoint`` (call before :meth:`run`)."""
        if self._started:
            raise RuntimeError("restore: expected a coordinator that has not run yet")
        check_checkpoint(checkpoint, run_id=self.run_id, config_hash=self.config_hash,
                         num_rounds=self.config.num_rounds, global_adapters=self._global, clients=self.clients)
        restore_trunk(self.trunk, checkpoint.trunk)
        restore_rng(checkpoint.rng)
        with self._cond:
            self._global = {k: v.detach().clone() for k, v in checkpoint.global_adapters.items()}
            self._client_steps.update(checkpoint.client_steps)
            self.completed_round = checkpoint.round
            self._restored(checkpoint)
        self._log("resumed", round=checkpoint.round)

    def _restored(self, checkpoint: Checkpoint) -> None:
        """What else a driver takes from ``checkpoint`` (lock held)."""

    # -- sessions -------------------------------------------------------------------------------
    def handler_for(self, client_id: str) -> Handler:
        """The request handler of one new session of ``client_id``."""
        with self._cond:
            if client_id in self._sessions:
                self._sessions[client_id].open += 1
        return functools.partial(self._handle, client_id)

    def on_disconnect(self, client_id: str) -> None:
        """One session of ``client_id`` ended; when it was the last, its generation caches are dropped and
        the driver ends what the client was doing (:meth:`_session_lost`)."""
        with self._cond:
            session = self._sessions.get(client_id)
            if session is None:
                return
            session.open = max(0, session.open - 1)
            if session.open > 0:
                return
            if self.generation is not None:
                self.generation.drop_client(client_id)
            self._session_lost(client_id)
            self._cond.notify_all()

    def _session_lost(self, client_id: str) -> None:
        """The last session of ``client_id`` ended (lock held)."""
        raise NotImplementedError

    def _join(self, client_id: str, kind: int, round: int, step: int, request: pb.JoinRound) -> pb.RoundPlan:
        """JOIN_ROUND: the client's data report (its first fixes its weight; later joins, polls, change nothing,
        so only it is read), then the run's end, its failure or an evaluation plan, else :meth:`_plan`."""
        first = client_id not in self._data_reports
        report = read_data_report(client_id, request, self.config.contract_hash) if first else None
        with self._cond:
            weight = record_data_report(self._data_reports, client_id, int(request.num_examples),
                                        self.config.max_examples_per_client)
            if weight is not None:
                self._log("data_report", client=client_id, num_examples=int(request.num_examples), weight=weight,
                          **announce_data_report(client_id, weight, report))
            if self._stage is RoundStage.DONE:
                return pb.RoundPlan(round=self.completed_round, finished=True, adapters=encode_named(self._global))
            if self._stage is RoundStage.FAILED:
                raise ProtocolError(f"the run failed: {self._error}", code=pb.ABORTED)
            if self._stage is RoundStage.EVALUATING and (evaluate := self._evaluation.plan_for(client_id)):
                return evaluate
            return self._plan(client_id)

    def _plan(self, client_id: str) -> pb.RoundPlan:
        """The plan of a JOIN_ROUND while the run goes on (lock held): a round to train, or wait."""
        raise NotImplementedError

    def _handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        if client_id not in self._sessions:
            raise ProtocolError(f"client {client_id!r} is not admitted to this run", code=pb.PERMISSION_DENIED)
        serve = self._serve.get(kind)
        if serve is None:
            raise ProtocolError(f"the coordinator does not serve {kind_name(kind)}", code=pb.FAILED_PRECONDITION)
        if kind == pb.FORWARD and not request.train:  # evaluation: changes nothing, keeps nobody alive
            with self._evaluation.forward(self._sessions[client_id], lambda: (self._stage, self.completed_round)):
                return self.trunk.handle(client_id, kind, round, step, request)
        with self._sessions[client_id].request(self._cond):
            return serve(client_id, kind, round, step, request)

    def _serve_generation(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        """GENERATE_*: when the trunk is not training (between rounds, or once the run is over), as
        evaluation (a round waits for it)."""
        if self.generation is None:
            raise ProtocolError("this server does not serve generation", code=pb.FAILED_PRECONDITION)
        with self._evaluation.forward(None, lambda: (self._stage, self.completed_round), "generation",
                                      anytime=kind == pb.GENERATE_END):
            return self.generation.handle(client_id, kind, round, step, request)

    def _receive_eval(self, client_id: str, kind: int, round: int, step: int, request: pb.EvalReport) -> pb.EvalAck:
        with self._cond:
            return self._evaluation.receive(client_id, request, self._stage, self._data_reports.get(client_id, 0))

    def _log(self, event: str, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.write(event, **fields)
