"""What the sync and async round drivers share: stopping, running in a background thread, and the
read-only view of their state (:class:`~fedsplit.server.coordinator.RoundCoordinator`,
:class:`~fedsplit.server.async_rounds.AsyncCoordinator`)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Self

from torch import Tensor

from fedsplit.adapters import adapter_state_dict
from fedsplit.server.rounds import RoundStage, RunResult, RunStoppedError


class RunDriver:
    """Mixed into a coordinator that has ``_cond``, ``_stopping``, ``_thread``, ``_error``, ``_stage``,
    ``_global``, ``_client_steps``, ``trunk``, ``completed_round``, ``history``, ``config`` and ``run()``."""

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

    def run(self) -> RunResult:
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
