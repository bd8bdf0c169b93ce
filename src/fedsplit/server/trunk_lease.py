"""The trunk's "pass" lease: clients share the trunk pass by pass (FL-GLM, arXiv 2406.14898, Alg. 1).

With ``[server] trunk_lease = "step"`` (the default, :class:`~fedsplit.server.trunk.TrunkServer`) a
client holds the trunk from its first training FORWARD until its OPTIMIZER_STEP, so the gradients
the trunk accumulates belong to one client step. A client behind a slow link keeps the trunk idle
for everyone during its round trips. With ``trunk_lease = "pass"`` the trunk is held only while it
computes (one FORWARD, one BACKWARD, one commit)::

    FORWARD (first of a step)  snapshot = leaf clones of the trunk's trainable (LoRA) tensors;
                               the trunk runs with them (torch.func.functional_call), the frozen
                               base weights are shared
    FORWARD / BACKWARD         each micro-batch's graph holds that client's snapshot, so its
                               gradient is taken at the weights its step's first FORWARD saw and
                               lands in the snapshot's ``.grad`` (the client's own buffer), however
                               many commits of other clients the live parameters took meanwhile
                               (they are updated in place; the saved graph never refers to them)
    OPTIMIZER_STEP             the buffer becomes the live parameters' ``.grad`` and is committed
                               with :func:`~fedsplit.server.trunk.commit_step` (global-norm clip with
                               the client's squared norm, LR schedule, non-finite refusal and
                               rollback, step count); the snapshot is dropped, committed or not

Exactness. With one client, or whenever the clients' steps do not interleave (each step's FORWARDs,
BACKWARDs and OPTIMIZER_STEP come before the next client's first FORWARD: the coordinator's
round-robin turns, ``ordered_steps``, which sync rounds use, force this), "pass" computes the same
tensors in the same order as "step": replies, gradients, optimizer state and checkpoints are equal
bit for bit. When steps interleave (semi_sync rounds, turns off), a client's trunk gradient is the
gradient at the trunk weights of its step's first FORWARD, applied to the weights after every
commit that came in between: asynchronous SGD whose staleness is the number of other clients'
commits between that FORWARD and this OPTIMIZER_STEP. It is at most ``clients - 1`` when every
client takes at most one step while another's is in flight (similar speeds); a fast client may
commit several steps during one slow step, so the general bound is the other participants' steps
in the round, ``(clients - 1) * local_steps``. :attr:`PassLease.staleness` counts the committed
steps by their staleness. All micro-batches of one step use the same snapshot, so accumulated
gradients belong to one set of weights.

Memory: one snapshot of the trainable tensors and its gradient per client with a step in flight
(LoRA: small), plus one autograd graph (the trunk's activations) per client between its FORWARD and
its BACKWARD; "step" holds at most one of each.

Failures. A client that drops mid-step (:meth:`PassLease.discard`, via ``TrunkServer.abort``) loses
its buffer and graph; nothing of it reached the live parameters, so the other clients' steps are
unaffected. Only committed steps change the parameters and optimizer, so checkpoints (taken between
rounds, after the coordinator quiesced the trunk) hold committed steps only.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedsplit.protocol import ProtocolError, pb

LEASES = ("step", "pass")


def check_lease(lease: str) -> None:
    if lease not in LEASES:
        raise ValueError(f"trunk_lease: expected one of {', '.join(LEASES)}, got {lease!r}")


@dataclass
class StepBuffer:
    """One client's step in flight: the weights its FORWARDs run with, which accumulate its gradient."""

    weights: dict[str, torch.Tensor]  # name -> leaf clone of a trainable parameter; .grad is the buffer
    snapshot_step: int  # the trunk's steps_taken when the snapshot was taken

    def load_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Hand the buffer to the live parameters (their ``.grad`` is None between commits)."""
        for param, weight in zip(params, self.weights.values(), strict=True):
            param.grad = weight.grad


class PassLease:
    """Per-client snapshots and gradient buffers, and the lock held for one trunk computation."""

    def __init__(self, trunk: torch.nn.Module, params: Sequence[torch.nn.Parameter], timeout_s: float) -> None:
        named = [(name, p) for name, p in trunk.named_parameters() if p.requires_grad]
        if [p for _, p in named] != list(params):
            raise ValueError("PassLease: expected params to be the trunk's trainable parameters, in order")
        self._named = named
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._holder: str | None = None
        self._buffers: dict[str, StepBuffer] = {}
        self.staleness: Counter[int] = Counter()  # committed steps by staleness (other clients' commits)

    @contextmanager
    def hold(self, client_id: str) -> Iterator[None]:
        """Hold the trunk for one computation (a FORWARD, a BACKWARD or a commit)."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise ProtocolError(f"trunk busy with client {self._holder} for {self.timeout_s:.0f} s", code=pb.ABORTED)
        self._holder = client_id
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    def weights(self, client_id: str, steps_taken: int) -> dict[str, torch.Tensor]:
        """The weights of ``client_id``'s step: snapshot at its first FORWARD (call holding the trunk)."""
        buffer = self._buffers.get(client_id)
        if buffer is None:
            snapshot = {name: p.detach().clone().requires_grad_() for name, p in self._named}
            buffer = self._buffers[client_id] = StepBuffer(snapshot, steps_taken)
        return buffer.weights

    def take(self, client_id: str) -> StepBuffer | None:
        """Remove and return ``client_id``'s step buffer (at its OPTIMIZER_STEP)."""
        return self._buffers.pop(client_id, None)

    def discard(self, client_id: str) -> bool:
        """Forget ``client_id``'s step in flight; returns whether there was one."""
        return self._buffers.pop(client_id, None) is not None

    def in_flight(self) -> list[str]:
        """The clients with a step buffer, sorted."""
        return sorted(self._buffers)
