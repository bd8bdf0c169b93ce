"""The server's side of a split step: the trunk and its optimizer (FL-GLM, arXiv 2406.14898, Alg. 1).

One :class:`TrunkServer` serves any number of client sessions. In sequential mode a client holds
a *lease* on the trunk from its first training FORWARD until its OPTIMIZER_STEP, so the
gradients the trunk accumulates belong to one client step only; other clients wait their turn.
Everything that arrives is checked (dtype, shape, size, NaN/Inf, protocol state) and a bad
request is answered with an error to that client alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import torch
from google.protobuf.message import Message

from fedsplit.adapters import trainable_parameters
from fedsplit.protocol import ProtocolError, decode_tensor, encode_tensor, kind_name, pb
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import autocast, build_optimizer, clip_coefficient, grad_sq_norm, scale_grads, set_lr

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    inputs: torch.Tensor  # (B, T, H) leaf whose .grad goes back to the client
    outputs: torch.Tensor  # (B, T, H) trunk output, still attached to the graph


def check_client_sq_norm(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ProtocolError(f"OptimizerStep.client_grad_sq_norm: expected a finite value >= 0, got {value}")


def commit_step(server: TrunkServer, client_sq_norm: float, lr_scale: float = 1.0) -> pb.OptimizerResult:
    """Clip by the global norm (trunk + clients' squared norms), step the trunk, count the step.

    ``lr_scale`` > 1 when one step stands for several clients' steps (client-batching): the
    linear scaling rule keeps the trunk's progress per sample that of sequential training.
    """
    total = math.sqrt(grad_sq_norm(server.params) + client_sq_norm)
    coef = clip_coefficient(total, server.cfg.max_grad_norm)
    scale_grads(server.params, coef)
    lr = set_lr(server.optimizer, server.steps_taken, server.cfg, server.total_steps) * lr_scale
    for group in server.optimizer.param_groups:
        group["lr"] = lr
    server.optimizer.step()
    server.optimizer.zero_grad(set_to_none=True)
    server.steps_taken += 1
    return pb.OptimizerResult(total_grad_norm=total, clip_coef=coef, server_step=server.steps_taken)


class TrunkServer:
    """Owns the trunk; answers FORWARD, BACKWARD and OPTIMIZER_STEP requests."""

    def __init__(
        self,
        trunk: Trunk,
        cfg: TrainConfig,
        total_steps: int,
        *,
        max_tokens: int = 1 << 20,
        lease_timeout_s: float = 120.0,
    ) -> None:
        self.trunk = trunk
        self.cfg = cfg
        self.total_steps = total_steps
        self.max_tokens = max_tokens
        self.lease_timeout_s = lease_timeout_s
        self.params = trainable_parameters(trunk)
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_taken = 0
        self.hidden_size = int(trunk.config.hidden_size)
        self.dtype = next(trunk.parameters()).dtype
        self._pending: dict[str, _Pending] = {}
        self._owner: str | None = None
        self._cond = threading.Condition()

    # -- dispatch -----------------------------------------------------------------------------
    def handle(self, client_id: str, kind: int, round: int, step: int, request: Message) -> Message:
        handlers = {pb.FORWARD: self.forward, pb.BACKWARD: self.backward, pb.OPTIMIZER_STEP: self.optimizer_step}
        if kind not in handlers:
            raise ProtocolError(f"the trunk does not serve {kind_name(kind)}", code=pb.FAILED_PRECONDITION)
        return handlers[kind](client_id, request)

    # -- the step -----------------------------------------------------------------------------
    def decode_forward(self, request: pb.Forward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check a FORWARD request against this trunk: (hidden (B, T, H), mask (B, T), positions (B, T))."""
        hidden = decode_tensor(request.hidden, "Forward.hidden", dtypes=(self.dtype,), shape=(None, None, self.hidden_size))
        batch, seq, _ = hidden.shape
        if batch * seq > self.max_tokens:
            raise ProtocolError(
                f"Forward.hidden: {batch}x{seq} tokens exceed the server limit of {self.max_tokens}",
                code=pb.RESOURCE_EXHAUSTED,
            )
        mask = decode_tensor(request.attention_mask, "Forward.attention_mask", dtypes=(torch.bool,), shape=(batch, seq))
        positions = decode_tensor(request.position_ids, "Forward.position_ids", dtypes=(torch.int64,), shape=(batch, seq))
        return hidden, mask, positions

    def forward(self, client_id: str, request: pb.Forward) -> pb.ForwardResult:
        hidden, mask, positions = self.decode_forward(request)
        if not request.train:
            with torch.no_grad(), autocast(self.cfg):
                return pb.ForwardResult(hidden=encode_tensor(self.trunk(hidden, mask, positions)))
        self._acquire(client_id)
        if client_id in self._pending:
            raise ProtocolError("FORWARD again before BACKWARD of the previous step", code=pb.FAILED_PRECONDITION)
        inputs = hidden.requires_grad_()  # (B, T, H) leaf: its gradient is the reply to BACKWARD
        with autocast(self.cfg):
            outputs = self.trunk(inputs, mask, positions)  # (B, T, H)
        self._pending[client_id] = _Pending(inputs, outputs)
        return pb.ForwardResult(hidden=encode_tensor(outputs))

    def backward(self, client_id: str, request: pb.Backward) -> pb.BackwardResult:
        pending = self._pending.pop(client_id, None)
        if pending is None:
            raise ProtocolError("BACKWARD without a training FORWARD", code=pb.FAILED_PRECONDITION)
        grad = decode_tensor(request.grad, "Backward.grad", dtypes=(pending.outputs.dtype,), shape=tuple(pending.outputs.shape))
        pending.outputs.backward(grad)
        return pb.BackwardResult(grad=encode_tensor(pending.inputs.grad))

    def optimizer_step(self, client_id: str, request: pb.OptimizerStep) -> pb.OptimizerResult:
        if self._owner != client_id:
            raise ProtocolError("OPTIMIZER_STEP without accumulated gradients", code=pb.FAILED_PRECONDITION)
        check_client_sq_norm(request.client_grad_sq_norm)
        result = commit_step(self, request.client_grad_sq_norm)
        self._release(client_id)
        return result

    def end_round(self, round: int) -> None:
        """One trunk: nothing to reconcile at round end (the hierarchical router averages here)."""

    # -- the lease ----------------------------------------------------------------------------
    def _acquire(self, client_id: str) -> None:
        deadline = time.monotonic() + self.lease_timeout_s
        with self._cond:
            while self._owner not in (None, client_id):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProtocolError(f"trunk busy with client {self._owner} for {self.lease_timeout_s:.0f} s", code=pb.ABORTED)
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
        with self._cond:
            owned = self._owner == client_id
        if owned:
            self.optimizer.zero_grad(set_to_none=True)  # its gradients must not leak into the next step
            self._release(client_id)
            log.warning("client %s: partial step discarded", client_id)
        return had_pending or owned
