"""The trunk over the network: a :class:`~fedsplit.inference.generate.TrunkLink` on the run's sealed session.

Every request is a frame of the session the client trains on (serialize -> seal -> send, STYLE
rule 7); the server's :class:`fedsplit.server.generation.GenerationService` keeps the trunk's cache.
:class:`RerunTrunk` is the baseline without caches (FL-GLM's code): every token sends the whole
prefix through the trunk again as an evaluation FORWARD.
"""

from __future__ import annotations

import itertools
import logging
import threading

import torch

from fedsplit.channel import Channel, RemoteError
from fedsplit.protocol import decode_tensor, encode_tensor, pb

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_ids_lock = threading.Lock()


def _next_id() -> int:
    with _ids_lock:
        return next(_ids)


class RemoteTrunk:
    """GENERATE_PREFILL / GENERATE_STEP / GENERATE_END over ``channel``; one request at a time."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.request_id: int | None = None

    def prefill(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        self.request_id = _next_id()
        reply = self.channel.call(pb.GENERATE_PREFILL, pb.GeneratePrefill(
            request_id=self.request_id, hidden=encode_tensor(hidden),
            attention_mask=encode_tensor(attention_mask.bool()), position_ids=encode_tensor(position_ids),
            max_new_tokens=max_new_tokens))
        return self._hidden(reply, hidden.shape)

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        reply = self.channel.call(pb.GENERATE_STEP, pb.GenerateStep(
            request_id=self.request_id or 0, hidden=encode_tensor(hidden), position_ids=encode_tensor(position_ids)))
        return self._hidden(reply, hidden.shape)

    def end(self) -> None:
        """Drop the server's cache; a failure here is logged, not raised (it must not hide the error
        that ended the generation, and the server evicts an idle cache anyway)."""
        if self.request_id is not None:
            request_id, self.request_id = self.request_id, None
            try:
                self.channel.call(pb.GENERATE_END, pb.GenerateEnd(request_id=request_id))
            except (RemoteError, ConnectionError, OSError) as exc:
                log.warning("GENERATE_END of request %d failed: %s", request_id, exc)

    def _hidden(self, reply: pb.GenerateResult, shape: torch.Size) -> torch.Tensor:
        return decode_tensor(reply.hidden, "GenerateResult.hidden", shape=tuple(shape))


class RerunTrunk:
    """No trunk cache: every step sends the whole sequence so far as an evaluation FORWARD (the baseline).

    It serves :func:`fedsplit.inference.baseline.rerun_generate`, which re-runs head and tail on the
    whole prefix too; ``prefill`` is the only call it answers.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        reply = self.channel.call(pb.FORWARD, pb.Forward(
            hidden=encode_tensor(hidden), attention_mask=encode_tensor(attention_mask.bool()),
            position_ids=encode_tensor(position_ids), train=False))
        return decode_tensor(reply.hidden, "ForwardResult.hidden", shape=tuple(hidden.shape))
