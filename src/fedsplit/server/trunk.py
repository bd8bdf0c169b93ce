"""The server's side of a split step: the trunk and its optimizer (FL-GLM, arXiv 2406.14898, Alg. 1).

One :class:`TrunkServer` serves any number of client sessions. In sequential mode with
``lease="step"`` (the default) a client holds a *lease* on the trunk from its first training
FORWARD until its OPTIMIZER_STEP, so the gradients the trunk accumulates belong to one client step
only; other clients wait their turn. With ``lease="pass"`` the trunk is held only while it computes
and each client's step accumulates its gradient in its own buffer, at the weights its first FORWARD
saw (:mod:`fedsplit.server.trunk_lease` states the exactness: equal to "step" bit for bit unless
clients' steps interleave; asynchronous SGD with bounded staleness when they do).
Everything that arrives is checked (dtype, shape, size, NaN/Inf, protocol state) and a bad
request is answered with an error to that client alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from google.protobuf.message import Message

from fedsplit.adapters import trainable_parameters
from fedsplit.protocol import ProtocolError, decode_tensor, kind_name, pb
from fedsplit.protocol.precision import from_wire, to_wire
from fedsplit.server.checkpoint import TrunkHolder
from fedsplit.server.trunk_lease import PassLease, check_lease
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import (
    NonFiniteStepError,
    autocast,
    build_optimizer,
    clip_coefficient,
    global_norm,
    grad_sq_norm,
    guarded_step,
    scale_grads,
    set_lr,
)

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    inputs: torch.Tensor  # (B, T, H) leaf whose .grad goes back to the client
    outputs: torch.Tensor  # (B, T, H) trunk output, still attached to the graph


def check_client_sq_norm(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ProtocolError(f"OptimizerStep.client_grad_sq_norm: expected a finite value >= 0, got {value}")


class StepTarget(TrunkHolder, Protocol):
    """What :func:`commit_step` steps: a trunk holder (as checkpoints see it) with its trainable
    parameters, its training configuration and its schedule's length."""

    params: list[torch.nn.Parameter]
    cfg: TrainConfig
    total_steps: int


def commit_step(server: StepTarget, client_sq_norm: float, lr_scale: float = 1.0) -> pb.OptimizerResult:
    """Clip by the global norm (trunk + clients' squared norms), step the trunk, count the step.

    ``lr_scale`` > 1 when one step stands for several clients' steps (client-batching): the
    linear scaling rule keeps the trunk's progress per sample that of sequential training.
    A step whose norm, gradients or result is not finite is refused and undone: the trunk's
    parameters and moments stay as they were, its gradients are dropped, and the requester gets
    BAD_REQUEST saying why. Nothing non-finite is ever committed (and so never checkpointed).
    """
    try:
        total = global_norm(grad_sq_norm(server.params), client_sq_norm)
        coef = clip_coefficient(total, server.cfg.max_grad_norm)
        scale_grads(server.params, coef)
        lr = set_lr(server.optimizer, server.steps_taken, server.cfg, server.total_steps) * lr_scale
        for group in server.optimizer.param_groups:
            group["lr"] = lr
        guarded_step(server.optimizer, server.params)
    except NonFiniteStepError as exc:
        server.optimizer.zero_grad(set_to_none=True)
        log.warning("trunk step %d refused: %s", server.steps_taken + 1, exc)
        raise ProtocolError(f"OPTIMIZER_STEP refused, the trunk is unchanged: {exc}") from None
    server.optimizer.zero_grad(set_to_none=True)
    server.steps_taken += 1
    return pb.OptimizerResult(total_grad_norm=total, clip_coef=coef, server_step=server.steps_taken)


def decode_activation(message: pb.Tensor, name: str, *, dtype: torch.dtype, shape: tuple[int | None, ...],
                      max_abs: float, wire: torch.dtype | None = None) -> torch.Tensor:
    """A hidden state or its gradient from a client: dtype, shape, finite, and ``|x| <= max_abs``.

    ``wire``: the run's wire dtype (``[wire] dtype``); the tensor must arrive in it and is cast to
    ``dtype``. ``None``: it must arrive in ``dtype`` itself.
    """
    if wire is None:
        tensor = decode_tensor(message, name, dtypes=(dtype,), shape=shape)
    else:
        tensor = from_wire(message, name, wire=wire, compute=dtype, shape=shape)
    if tensor.numel():
        peak = float(tensor.abs().max())
        if peak > max_abs:
            raise ProtocolError(
                f"{name}: a value of magnitude {peak:.3g} exceeds the limit {max_abs:g} (server.max_abs_value)"
            )
    return tensor


class TrunkServer:
    """Owns the trunk; answers FORWARD, BACKWARD and OPTIMIZER_STEP requests."""

    def __init__(
        self,
        trunk: Trunk,
        cfg: TrainConfig,
        total_steps: int,
        *,
        max_tokens: int = 1 << 20,
        max_abs: float = 65504.0,
        lease_timeout_s: float = 120.0,
        wire_dtype: torch.dtype | None = None,
        lease: str = "step",
    ) -> None:
        check_lease(lease)
        if not max_abs > 0:
            raise ValueError(f"max_abs: expected > 0, got {max_abs}")
        self.trunk = trunk
        self.max_abs = max_abs
        self.cfg = cfg
        self.total_steps = total_steps
        self.max_tokens = max_tokens
        self.lease_timeout_s = lease_timeout_s
        self.params = trainable_parameters(trunk)
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_taken = 0
        self.hidden_size = int(trunk.config.hidden_size)
        self.max_positions = int(getattr(trunk.config, "max_position_embeddings", None) or 1 << 20)
        self.dtype = next(trunk.parameters()).dtype
        self.wire_dtype = wire_dtype  # hidden states and gradients cross the cut in it (None: in self.dtype)
        self._pending: dict[str, _Pending] = {}
        self._owner: str | None = None
        self._cond = threading.Condition()
        self.lease = lease  # "step": held from FORWARD to OPTIMIZER_STEP; "pass": per computation (trunk_lease.py)
        self.passes = PassLease(trunk, self.params, lease_timeout_s) if lease == "pass" else None

    # -- dispatch -----------------------------------------------------------------------------
    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        handlers: dict[int, Callable[[str, Any], Message]] = {
            pb.FORWARD: self.forward,
            pb.BACKWARD: self.backward,
            pb.OPTIMIZER_STEP: self.optimizer_step,
        }
        if kind not in handlers:
            raise ProtocolError(f"the trunk does not serve {kind_name(kind)}", code=pb.FAILED_PRECONDITION)
        return handlers[kind](client_id, request)

    # -- the step -----------------------------------------------------------------------------
    def decode_forward(self, request: pb.Forward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check a FORWARD request against this trunk: (hidden (B, T, H), mask (B, T), positions (B, T))."""
        shape = (None, None, self.hidden_size)
        hidden = decode_activation(
            request.hidden, "Forward.hidden", dtype=self.dtype, shape=shape, max_abs=self.max_abs, wire=self.wire_dtype
        )
        batch, seq, _ = hidden.shape
        if seq > self.cfg.max_length:
            raise ProtocolError(
                f"Forward.hidden: sequence length {seq} exceeds the run's train.max_length of {self.cfg.max_length}",
                code=pb.RESOURCE_EXHAUSTED,
            )
        if batch * seq > self.max_tokens:
            raise ProtocolError(
                f"Forward.hidden: {batch}x{seq} tokens exceed the server limit of {self.max_tokens}",
                code=pb.RESOURCE_EXHAUSTED,
            )
        mask = decode_tensor(request.attention_mask, "Forward.attention_mask", dtypes=(torch.bool,), shape=(batch, seq))
        positions = decode_tensor(
            request.position_ids, "Forward.position_ids", dtypes=(torch.int64,), shape=(batch, seq)
        )
        if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < self.max_positions):
            raise ProtocolError(
                f"Forward.position_ids: expected values in [0, {self.max_positions}), "
                f"got [{int(positions.min())}, {int(positions.max())}]"
            )
        return hidden, mask, positions

    def forward(self, client_id: str, request: pb.Forward) -> pb.ForwardResult:
        hidden, mask, positions = self.decode_forward(request)
        if not request.train:
            with torch.no_grad(), autocast(self.cfg):
                return pb.ForwardResult(hidden=self.encode_hidden(self.trunk(hidden, mask, positions)))
        if self.passes is not None:  # "pass": hold the trunk for this FORWARD only, run the step's snapshot
            with self.passes.hold(client_id):
                return self._forward_train(client_id, hidden, mask, positions,
                                           self.passes.weights(client_id, self.steps_taken))
        self._acquire(client_id)
        return self._forward_train(client_id, hidden, mask, positions, None)

    def _forward_train(self, client_id: str, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                       weights: dict[str, torch.Tensor] | None) -> pb.ForwardResult:
        """Run the trunk for a training step with the live parameters, or with ``weights`` in their place."""
        if client_id in self._pending:
            raise ProtocolError("FORWARD again before BACKWARD of the previous step", code=pb.FAILED_PRECONDITION)
        inputs = hidden.requires_grad_()  # (B, T, H) leaf: its gradient is the reply to BACKWARD
        with autocast(self.cfg):
            if weights is None:
                outputs = self.trunk(inputs, mask, positions)  # (B, T, H)
            else:  # the graph holds the snapshot, not the live parameters other clients' commits update
                outputs = torch.func.functional_call(self.trunk, weights, (inputs, mask, positions))  # (B, T, H)
        reply = pb.ForwardResult(hidden=self.encode_hidden(outputs))  # before the step is pending: may not fit fp16
        self._pending[client_id] = _Pending(inputs, outputs)
        return reply

    def backward(self, client_id: str, request: pb.Backward) -> pb.BackwardResult:
        pending = self._pending.get(client_id)
        if pending is None:
            raise ProtocolError("BACKWARD without a training FORWARD", code=pb.FAILED_PRECONDITION)
        outputs = pending.outputs  # a malformed BACKWARD leaves the pending step as it was
        grad = decode_activation(
            request.grad, "Backward.grad", dtype=outputs.dtype, shape=tuple(outputs.shape), max_abs=self.max_abs,
            wire=self.wire_dtype,
        )
        del self._pending[client_id]
        with self._computing(client_id):
            pending.outputs.backward(grad)  # "pass": into the client's snapshot's .grad, its own buffer
        assert pending.inputs.grad is not None  # the inputs are a leaf that requires grad
        return pb.BackwardResult(grad=to_wire(pending.inputs.grad, self.wire_dtype, "BackwardResult.grad"))

    def encode_hidden(self, outputs: torch.Tensor) -> pb.Tensor:
        """The trunk output (B, T, H) in the wire dtype."""
        return to_wire(outputs, self.wire_dtype, "ForwardResult.hidden")

    def optimizer_step(self, client_id: str, request: pb.OptimizerStep) -> pb.OptimizerResult:
        if client_id in self._pending:  # else its BACKWARD would land in a later step (another client's, "step")
            raise ProtocolError("OPTIMIZER_STEP before the BACKWARD of a pending training FORWARD",
                                code=pb.FAILED_PRECONDITION)
        if self.passes is not None:
            return self._commit_pass(client_id, request)
        if self._owner != client_id:
            raise ProtocolError("OPTIMIZER_STEP without accumulated gradients", code=pb.FAILED_PRECONDITION)
        try:
            check_client_sq_norm(request.client_grad_sq_norm)
            return commit_step(self, request.client_grad_sq_norm)
        except ProtocolError:
            self.optimizer.zero_grad(set_to_none=True)  # the refused step is rolled back for this client only
            raise
        finally:
            self._release(client_id)

    def _commit_pass(self, client_id: str, request: pb.OptimizerStep) -> pb.OptimizerResult:
        """OPTIMIZER_STEP with the "pass" lease: commit the client's buffer (gone afterwards, taken or refused)."""
        assert self.passes is not None
        buffer = self.passes.take(client_id)
        if buffer is None:
            raise ProtocolError("OPTIMIZER_STEP without accumulated gradients", code=pb.FAILED_PRECONDITION)
        with self.passes.hold(client_id):
            staleness = self.steps_taken - buffer.snapshot_step  # other clients' commits since its snapshot
            try:
                check_client_sq_norm(request.client_grad_sq_norm)
                buffer.load_grads(self.params)
                result = commit_step(self, request.client_grad_sq_norm)
            except ProtocolError:
                self.optimizer.zero_grad(set_to_none=True)  # the refused step is rolled back for this client only
                raise
            self.passes.staleness[staleness] += 1
        return result

    def _computing(self, client_id: str) -> AbstractContextManager[None]:
        """With the "pass" lease, hold the trunk while it computes; with "step", the client holds its lease already."""
        return self.passes.hold(client_id) if self.passes is not None else nullcontext()

    def end_round(self, round: int) -> None:
        """One trunk: nothing to reconcile at round end (the hierarchical router averages here)."""
        if self.passes is not None:
            log.info("round %d: trunk steps so far by staleness (other clients' commits in between): %s",
                     round, dict(sorted(self.passes.staleness.items())))

    # -- the lease ----------------------------------------------------------------------------
    def _acquire(self, client_id: str) -> None:
        deadline = time.monotonic() + self.lease_timeout_s
        with self._cond:
            while self._owner not in (None, client_id):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError(
                        f"trunk busy with client {self._owner} for {self.lease_timeout_s:.0f} s", code=pb.ABORTED
                    )
                self._cond.wait(remaining)
            self._owner = client_id

    def _release(self, client_id: str) -> None:
        with self._cond:
            if self._owner == client_id:
                self._owner = None
                self._cond.notify_all()

    def abort(self, client_id: str) -> bool:
        """Forget a client's partial step (it disconnected or timed out). Returns whether there was one."""
        had_pending = self._pending.pop(client_id, None) is not None
        if self.passes is not None:  # its buffer never reached the live parameters: the others are unaffected
            had_buffer = self.passes.discard(client_id)
            if had_buffer:
                log.warning("client %s: partial step discarded", client_id)
            return had_pending or had_buffer
        with self._cond:
            owned = self._owner == client_id
        if owned:
            self.optimizer.zero_grad(set_to_none=True)  # its gradients must not leak into the next step
            self._release(client_id)
            log.warning("client %s: partial step discarded", client_id)
        return had_pending or owned
