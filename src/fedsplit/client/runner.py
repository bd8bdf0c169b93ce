"""The client's round loop of FL-GLM (arXiv 2406.14898): join, train the client parts, send them back.

    connect -> JOIN_ROUND --wait_s--> sleep, ask again
                          --plan----> load the global head/tail adapters
                                      -> local_steps split steps over this client's own data
                                      -> CLIENT_UPDATE (head/tail adapters, num_examples, loss)
                          --finished> load the final global adapters; done

- The optimizer (AdamW moments) is created afresh every round: standard FedAvg. The global parts a
  client receives replace its own, and moments of its old weights would not describe them.
- The data order is a pure function of (seed, position in this client's step sequence) and the
  plan's ``first_step`` says where the client stands, so a restarted client, or a client of a run
  resumed from a checkpoint, replays exactly the batches an uninterrupted run would have used.
- A broken session (a ``retry_on`` error: the transport's ``ConnectionError``/``TimeoutError``, or a
  frame that does not parse) is reconnected through ``connect()`` with capped exponential backoff and
  seeded jitter; the client then rejoins. The server answers a rejoin mid-round with ``wait_s`` and
  readmits the client at the next round. A server error during training (``RemoteError``) also loses
  the round; a server error on JOIN_ROUND (not admitted, the run failed) ends the run.
- Errors that retrying cannot fix end the run at once with :class:`RunAbortedError` and a message
  that says so: a refused session (not admitted, revoked, configuration or protocol mismatch: the
  server's ``PERMISSION_DENIED``, ``UNAUTHENTICATED``, ``FAILED_PRECONDITION``, ``BAD_REQUEST``), a
  server that fails authentication, and a TLS certificate that does not fit (``SecurityError``).
  A refusal for lack of resources (``RESOURCE_EXHAUSTED``, ``ABORTED``, ``INTERNAL``) is transient.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedsplit.adapters import adapter_state_dict, load_adapter_state_dict
from fedsplit.channel import Channel, RemoteError
from fedsplit.client.evaluation import LocalEvaluator, PrivacyAudit, eval_report
from fedsplit.client.private_update import PrivateRoundError, PrivateUpdate
from fedsplit.client.proximal import proximal_hook
from fedsplit.client.split_client import SplitClient, StepResult
from fedsplit.protocol import ProtocolError, decode_named, encode_named, pb
from fedsplit.security.errors import SecurityError
from fedsplit.split.parts import Head, Tail
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import NonFiniteStepError

log = logging.getLogger(__name__)

Batch = Mapping[str, Tensor]  # input_ids, attention_mask, labels: each (B, T)
StepCallback = Callable[[int, int, StepResult], object]  # (round, optimizer steps taken so far, result); return ignored

HEAD_PREFIX = "head/"
TAIL_PREFIX = "tail/"


class RunAbortedError(RuntimeError):
    """The server refused this client or ended the run with an error."""


class ReconnectGaveUpError(ConnectionError):
    """The session broke and could not be re-established within the backoff's attempts."""


class SessionRefusedLaterError(ConnectionError):
    """The server refused the session for now (resources): retried with backoff like a lost connection."""


# Refusals of a session that the same request will meet again: the run cannot go on.
PERMANENT_REFUSALS: frozenset[int] = frozenset(
    {pb.PERMISSION_DENIED, pb.UNAUTHENTICATED, pb.FAILED_PRECONDITION, pb.BAD_REQUEST}
)
_HINTS: dict[int, str] = {
    pb.PERMISSION_DENIED: "ask the server's operator to admit this client's public key (security.clients)",
    pb.UNAUTHENTICATED: "check this client's identity key, the pinned server key and the clocks of both hosts",
    pb.FAILED_PRECONDITION: "client and server must run the same fedsplit version and configuration",
    pb.BAD_REQUEST: "client and server must run the same fedsplit version",
}


class PlanError(RuntimeError):
    """A RoundPlan lacks what this client needs to train (a server/client version mismatch)."""


# -- the client parts' adapters as one state dict (the FedAvg payload) --------------------------
def client_adapters(head: Head, tail: Tail) -> dict[str, Tensor]:
    """Head and tail LoRA weights under ``head/<PEFT key>`` and ``tail/<PEFT key>``."""
    tensors = {HEAD_PREFIX + k: v for k, v in adapter_state_dict(head).items()}
    tensors.update({TAIL_PREFIX + k: v for k, v in adapter_state_dict(tail).items()})
    return tensors


def load_client_adapters(head: Head, tail: Tail, tensors: Mapping[str, Tensor]) -> None:
    """Inverse of :func:`client_adapters`; keys and shapes must match exactly."""
    stray = sorted(k for k in tensors if not k.startswith((HEAD_PREFIX, TAIL_PREFIX)))
    if stray:
        raise PlanError(
            f"client adapters: expected keys starting with {HEAD_PREFIX!r} or {TAIL_PREFIX!r}, got {stray[:3]}"
        )
    load_adapter_state_dict(head, {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)})
    load_adapter_state_dict(tail, {k[len(TAIL_PREFIX):]: v for k, v in tensors.items() if k.startswith(TAIL_PREFIX)})


# -- data order and backoff: pure functions of their seeds -------------------------------------
def data_order(num_batches: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of micro-batches ``start .. start+count-1`` of an endless stream of shuffled epochs.

    Epoch ``e`` is the permutation ``default_rng([seed, e])`` of ``range(num_batches)``.
    """
    if num_batches < 1:
        raise ValueError(f"data_order: expected at least one batch, got {num_batches}")
    epochs: dict[int, np.ndarray] = {}
    order = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_batches)
        if epoch not in epochs:
            epochs[epoch] = np.random.default_rng([seed, epoch]).permutation(num_batches)
        order.append(int(epochs[epoch][offset]))
    return order


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt ``n`` waits ``min(max_s, base_s * 2**n) * U(0.5, 1)``."""

    base_s: float = 0.5
    max_s: float = 30.0
    max_attempts: int = 10  # consecutive failed attempts before giving up

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.max_s):
            raise ValueError(f"backoff: expected 0 < base_s <= max_s, got {self.base_s}, {self.max_s}")
        if self.max_attempts < 1:
            raise ValueError(f"backoff.max_attempts: expected >= 1, got {self.max_attempts}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_s, self.base_s * 2.0**attempt) * rng.uniform(0.5, 1.0)


@dataclass
class RoundReport:
    round: int
    loss: float  # mean over the round's optimizer steps
    num_examples: int
    first_step: int


@dataclass
class RunnerResult:
    rounds: list[RoundReport] = field(default_factory=list)
    final_round: int = 0  # the last round the server completed
    lost_rounds: int = 0  # rounds this client started but could not finish
    reconnects: int = 0
    finished: bool = False  # the server ended the run, and the head/tail hold its final global adapters


class ClientRunner:
    """One client of a federated run: its head, tail and data, and a way to (re)connect."""

    def __init__(
        self,
        client_id: str,
        head: Head,
        tail: Tail,
        batches: Sequence[Batch],
        cfg: TrainConfig,
        connect: Callable[[], Channel],
        *,
        backoff: Backoff | None = None,
        retry_on: tuple[type[Exception], ...] = (ConnectionError, TimeoutError, ProtocolError),
        on_step: StepCallback | None = None,
        hidden_noise_std: float = 0.0,
        data_report: pb.DataReport | None = None,
        evaluator: LocalEvaluator | None = None,
        audit: PrivacyAudit | None = None,
        private: PrivateUpdate | None = None,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        if not batches:
            raise ValueError(f"client {client_id}: expected at least one training batch, got none")
        self.client_id, self.head, self.tail, self.cfg = client_id, head, tail, cfg
        self.batches, self.connect = batches, connect
        self.backoff = backoff if backoff is not None else Backoff()
        self.retry_on, self.on_step = retry_on, on_step
        self.hidden_noise_std = hidden_noise_std  # privacy.hidden_noise_std: noise on the hidden states it sends
        self.evaluator, self.audit = evaluator, audit  # federated evaluation, privacy audit (client/evaluation.py)
        self.private = private  # [aggregation] secagg / ckks / hybrid: the update goes out masked or encrypted
        self.wire_dtype = wire_dtype  # [wire] dtype of what crosses the cut (None: as computed)
        self.result = RunnerResult()
        self.num_examples = sum(int(batch["input_ids"].shape[0]) for batch in batches)  # the data report
        self.data_report = data_report  # the counts of its own data, checked against the run's contract
        self.client: SplitClient | None = None  # the current round's split client
        self._channel: Channel | None = None
        self._jitter = random.Random(f"backoff:{client_id}:{cfg.seed}")
        self._failures = 0  # consecutive connection failures
        self._stop = threading.Event()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> RunnerResult:
        """Take part in rounds until the server says the run is finished (or :meth:`stop`)."""
        while not self._stop.is_set():
            try:
                plan = self._join()
                if plan.finished:
                    load_client_adapters(self.head, self.tail, decode_named(plan.adapters, "RoundPlan.adapters"))
                    self.result.final_round, self.result.finished = plan.round, True
                    return self.result
                if plan.evaluate:
                    self._evaluate_round(plan)
                    continue
                if plan.wait_s > 0:
                    self._stop.wait(plan.wait_s)
                    continue
                self._train_round(plan)
            except self.retry_on as exc:
                self._reconnect_later(exc)
        return self.result

    def _join(self) -> pb.RoundPlan:
        channel = self._ensure_channel()
        try:
            report = pb.JoinRound(last_round=self.result.final_round, num_examples=self.num_examples,  # data report
                                  data_report=self.data_report)
            plan = channel.call(pb.JOIN_ROUND, report)
        except RemoteError as exc:
            raise RunAbortedError(f"client {self.client_id}: the server refused JOIN_ROUND: {exc}") from exc
        self._failures = 0
        return plan

    def _train_round(self, plan: pb.RoundPlan) -> None:
        """Load the global parts, take ``local_steps`` split steps, send the parts back."""
        global_parts = decode_named(plan.adapters, "RoundPlan.adapters")
        load_client_adapters(self.head, self.tail, global_parts)
        self.client = client = self._split_client(plan)  # a fresh optimizer every round (FedAvg)
        client.before_step = proximal_hook(self.head, self.tail, global_parts, plan.settings)  # FedProx: mu > 0
        steps = self._round_batches(plan)  # local_steps lists of grad_accum micro-batches
        try:
            losses = [self._step(client, micro) for micro in steps]
            update = self._update(plan, steps, losses)
            if self.audit is not None:  # attack this round's own traffic; only the scores leave
                update.metrics.update(self.audit.scores(self.head, [b for micro in steps for b in micro], plan.round))
            if self.private is not None:  # client/private_update.py: plaintext part, then the encrypted phases
                self.private.submit(self._channel_or_fail(), plan, update, self.num_examples)
            else:
                self._channel_or_fail().call(pb.CLIENT_UPDATE, update, round=plan.round)
        except (RemoteError, NonFiniteStepError, PrivateRoundError) as exc:  # dropped, step or phase refused: rejoin
            log.warning("client %s: round %d lost: %s", self.client_id, plan.round, exc)
            self.result.lost_rounds += 1
            return
        report = RoundReport(plan.round, update.metrics["loss"], update.num_examples, plan.first_step)
        self.result.rounds.append(report)
        self.result.final_round = plan.round

    def _evaluate_round(self, plan: pb.RoundPlan) -> None:
        """Federated evaluation of the round's global parts on this client's own held-out data."""
        load_client_adapters(self.head, self.tail, decode_named(plan.adapters, "RoundPlan.adapters"))
        try:
            report = eval_report(self.evaluator, self.head, self.tail, self._channel_or_fail(), self.cfg, plan.round)
            self._channel_or_fail().call(pb.EVAL_REPORT, report, round=plan.round)
        except RemoteError as exc:  # the stage ended, or the report was refused: the run goes on
            log.warning("client %s: evaluation of round %d not counted: %s", self.client_id, plan.round, exc)

    def _step(self, client: SplitClient, micro: list[Batch]) -> float:
        result = client.train_step(micro)
        if self.on_step is not None:
            self.on_step(client.round, client.steps_taken, result)
        return result.loss

    def _round_batches(self, plan: pb.RoundPlan) -> list[list[Batch]]:
        accum = self.cfg.grad_accum
        order = data_order(len(self.batches), self.cfg.seed, plan.first_step * accum, plan.local_steps * accum)
        micro = [self.batches[i] for i in order]
        return [micro[i : i + accum] for i in range(0, len(micro), accum)]

    def _update(self, plan: pb.RoundPlan, steps: list[list[Batch]], losses: list[float]) -> pb.ClientUpdate:
        return pb.ClientUpdate(
            round=plan.round,
            adapters=encode_named(client_adapters(self.head, self.tail)),
            num_examples=sum(int(batch["input_ids"].shape[0]) for micro in steps for batch in micro),
            metrics={"loss": sum(losses) / len(losses)},
        )

    def _split_client(self, plan: pb.RoundPlan) -> SplitClient:
        if "total_steps" not in plan.settings:
            raise PlanError(
                f"RoundPlan.settings: expected 'total_steps' (LR schedule length), got {dict(plan.settings)}"
            )
        cfg = dataclasses.replace(self.cfg, lr=plan.lr)
        client = SplitClient(self.head, self.tail, self._channel_or_fail(), cfg, int(plan.settings["total_steps"]),
                             hidden_noise_std=self.hidden_noise_std, wire_dtype=self.wire_dtype)
        client.round = plan.round
        client.steps_taken = plan.first_step  # position in the LR schedule
        return client

    # -- connection -----------------------------------------------------------------------------
    def _ensure_channel(self) -> Channel:
        if self._channel is None:
            self._channel = self._open_session()
        return self._channel

    def _open_session(self) -> Channel:
        """``connect()``; a refusal or a security failure that retrying cannot fix ends the run."""
        try:
            return self.connect()
        except RemoteError as exc:  # the server answered the hello with an ERROR frame
            reason = f"the server refused the session ({pb.ErrorCode.Name(exc.code)}): {exc.remote_message}"
            if exc.code not in PERMANENT_REFUSALS:
                raise SessionRefusedLaterError(f"client {self.client_id}: {reason}") from exc
            raise RunAbortedError(
                f"client {self.client_id}: {reason}. Retrying cannot fix this; {_HINTS[exc.code]}"
            ) from exc
        except SecurityError as exc:  # the server failed authentication, or its TLS certificate does not fit
            raise RunAbortedError(
                f"client {self.client_id}: cannot open a session: {exc}. Retrying cannot fix this"
            ) from exc

    def _channel_or_fail(self) -> Channel:
        if self._channel is None:
            raise ConnectionError(f"client {self.client_id}: not connected")
        return self._channel

    def _reconnect_later(self, exc: Exception) -> None:
        """Drop the broken session and sleep before the next attempt; give up after max_attempts."""
        self._close_channel()
        self._failures += 1
        if self._failures > self.backoff.max_attempts:
            attempts = self.backoff.max_attempts
            raise ReconnectGaveUpError(f"client {self.client_id}: gave up after {attempts} attempts: {exc}") from exc
        delay = self.backoff.delay(self._failures - 1, self._jitter)
        log.warning("client %s: %s: %s; reconnecting in %.2f s", self.client_id, type(exc).__name__, exc, delay)
        self.result.reconnects += 1
        self._stop.wait(delay)

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - the session is already broken
                log.debug("client %s: closing a broken channel failed", self.client_id, exc_info=True)

    # -- control and evaluation -----------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return at its next wait."""
        self._stop.set()

    def close(self) -> None:
        """End the session (the server sees a disconnect)."""
        self._close_channel()

    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Mean supervised-token loss of the current head/tail with the server's trunk."""
        client = SplitClient(self.head, self.tail, self._ensure_channel(), self.cfg, total_steps=1,
                             wire_dtype=self.wire_dtype)
        client.round = self.result.final_round
        return client.eval_loss(batches)
