"""The client's side of a split step (FL-GLM, arXiv 2406.14898, Alg. 1).

The client owns the head, the tail, its data and its labels. Per micro-batch:

    head forward -> FORWARD(h_head) -> tail forward + loss -> tail backward
    -> BACKWARD(dL/dh_trunk) -> head backward
and per optimizer step OPTIMIZER_STEP(client grad norm) -> clip -> step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from fedsplit.adapters import trainable_parameters
from fedsplit.channel import Channel
from fedsplit.protocol import decode_tensor, encode_tensor, pb
from fedsplit.protocol.precision import from_wire, to_wire
from fedsplit.split.parts import Head, Tail, positions_from_mask
from fedsplit.train.config import TrainConfig
from fedsplit.train.lm_loss import chunked_causal_lm_loss
from fedsplit.train.optim import (
    NonFiniteStepError,
    StepResult,
    autocast,
    build_optimizer,
    causal_lm_loss,
    grad_sq_norm,
    guarded_step,
    scale_grads,
    set_lr,
    token_weighted_loss,
)


class SplitClient:
    """Owns head + tail + optimizer; talks to the server only through its :class:`Channel`."""

    def __init__(
        self, head: Head, tail: Tail, channel: Channel, cfg: TrainConfig, total_steps: int,
        hidden_noise_std: float = 0.0, wire_dtype: torch.dtype | None = None,
    ) -> None:
        if not hidden_noise_std >= 0.0:
            raise ValueError(f"hidden_noise_std: expected >= 0, got {hidden_noise_std!r}")
        self.head, self.tail, self.channel, self.cfg = head, tail, channel, cfg
        self.total_steps = total_steps
        self.hidden_noise_std = hidden_noise_std  # privacy: Gaussian noise on every h_head sent (training, evaluation)
        self.wire_dtype = wire_dtype  # [wire] dtype of hidden states and gradients (None: as computed)
        self.params = trainable_parameters(head) + trainable_parameters(tail)
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_taken = 0
        self.micro_steps = 0
        self.round = 0
        self.before_step: Callable[[], None] | None = None  # e.g. FedProx's proximal gradient, before the clip

    def _hidden(self, message: pb.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
        if self.wire_dtype is None:
            return decode_tensor(message, name, dtypes=(like.dtype,), shape=tuple(like.shape))
        return from_wire(message, name, wire=self.wire_dtype, compute=like.dtype, shape=tuple(like.shape))

    def _through_trunk(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head forward, then FORWARD to the server: (h_head (B, T, H), trunk output (B, T, H))."""
        with autocast(self.cfg):
            h_head = self.head(ids, mask, positions)  # (B, T, H) -> cut 1
        sent = self._privatize(h_head)  # evaluation too: held-out text is as private as training text
        forward = pb.Forward(
            hidden=to_wire(sent, self.wire_dtype, "Forward.hidden"),
            attention_mask=encode_tensor(mask.bool()),
            position_ids=encode_tensor(positions),
            train=train,
        )
        reply = self.channel.call(pb.FORWARD, forward, round=self.round, step=self.micro_steps)
        return h_head, self._hidden(reply.hidden, h_head, "ForwardResult.hidden")  # <- cut 2

    def _privatize(self, h_head: torch.Tensor) -> torch.Tensor:
        """FedSEA-LLaMA's defence: h + N(0, sigma^2) on the wire. Additive, so dL/dh_sent = dL/dh_head."""
        if self.hidden_noise_std == 0.0:
            return h_head
        return h_head.detach() + self.hidden_noise_std * torch.randn_like(h_head)  # (B, T, H)

    def forward_backward(self, batch: Mapping[str, torch.Tensor]) -> float:
        """One micro-batch: forward through all three parts, backward through all three."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        positions = positions_from_mask(mask)  # (B, T)
        self.micro_steps += 1
        h_head, trunk_out = self._through_trunk(ids, mask, positions, train=True)
        h_trunk = trunk_out.requires_grad_()  # (B, T, H)
        with autocast(self.cfg):
            loss = self._loss(self.tail.final_hidden(h_trunk, mask, positions), labels)
        (loss / self.cfg.grad_accum).backward()
        assert h_trunk.grad is not None  # h_trunk is a leaf that requires grad, and the loss used it
        reply = self.channel.call(
            pb.BACKWARD, pb.Backward(grad=to_wire(h_trunk.grad, self.wire_dtype, "Backward.grad")), round=self.round,
            step=self.micro_steps
        )
        h_head.backward(self._hidden(reply.grad, h_head, "BackwardResult.grad"))  # dL/dh_head <- cut 1
        return float(loss.detach())

    def optimizer_step(self) -> StepResult:
        """Commit the accumulated gradients on both sides with one global clip coefficient.

        Nothing non-finite is committed: the server refuses a non-finite norm (and rolls its side
        back), a clip coefficient outside [0, 1] is refused here, and a local step that would leave
        a non-finite parameter or moment is undone. A refused step drops this step's gradients.
        """
        try:
            if self.before_step is not None:
                self.before_step()
            request = pb.OptimizerStep(client_grad_sq_norm=grad_sq_norm(self.params))
            reply = self.channel.call(pb.OPTIMIZER_STEP, request, round=self.round, step=self.micro_steps)
            if not (math.isfinite(reply.clip_coef) and 0.0 <= reply.clip_coef <= 1.0):
                raise NonFiniteStepError(
                    f"OptimizerResult.clip_coef: expected a value in [0, 1], got {reply.clip_coef}"
                )
            scale_grads(self.params, reply.clip_coef)
            lr = set_lr(self.optimizer, self.steps_taken, self.cfg, self.total_steps)
            guarded_step(self.optimizer, self.params)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        return StepResult(loss=math.nan, grad_norm=reply.total_grad_norm, lr=lr)

    def train_step(self, micro_batches: Iterable[Mapping[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``cfg.grad_accum`` micro-batches; returns their mean loss."""
        losses = [self.forward_backward(batch) for batch in micro_batches]
        if len(losses) != self.cfg.grad_accum:
            raise ValueError(f"train_step: expected {self.cfg.grad_accum} micro-batches, got {len(losses)}")
        result = self.optimizer_step()
        result.loss = sum(losses) / len(losses)
        return result

    def _loss(self, final_hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The causal-LM loss of the tail's normed output ``(B, T, H)``: LM head + cross-entropy, in chunks of
        ``train.loss_chunk_tokens`` positions (the batch's logits are never held at once), or all at once (0)."""
        with autocast(self.cfg):
            if self.cfg.loss_chunk_tokens:
                return chunked_causal_lm_loss(final_hidden, self.tail.output_head(), labels, self.cfg.loss_chunk_tokens)
            return causal_lm_loss(self.tail.output_head()(final_hidden), labels)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
        """Mean supervised-token loss, through the server without keeping a graph."""
        return token_weighted_loss(((self._eval_hidden(batch), batch["labels"]) for batch in batches),
                                   loss=self._loss)

    def _eval_hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the LM head reads ``(B, T, H)`` for an evaluation batch: head -> trunk -> tail blocks + norm."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = positions_from_mask(mask)
        _, trunk_out = self._through_trunk(ids, mask, positions, train=False)
        with autocast(self.cfg):
            hidden: torch.Tensor = self.tail.final_hidden(trunk_out, mask, positions)
            return hidden

    def eval_target_logprobs(self, batch: Mapping[str, torch.Tensor], keep: int) -> torch.Tensor:
        """log p of each of the batch's last ``keep - 1`` labels ``(B, keep - 1)`` (0 where ignored), with the LM
        head run one row at a time: the batch's logits are never held at once (a
        :data:`fedsplit.eval.scoring.TargetLogprobsFn`)."""
        from fedsplit.eval.scoring import last_labels, row_target_logprobs

        targets = last_labels(batch["labels"], keep - 1)  # (B, keep-1)
        hidden = self._eval_hidden(batch)[:, -keep:-1]  # (B, keep-1, H)
        with autocast(self.cfg):
            head = self.tail.output_head()
            return torch.stack([row_target_logprobs(head(hidden[row]), targets[row]) for row in range(len(targets))])

    def _eval_logits(self, batch: Mapping[str, torch.Tensor], keep: int | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``, or of the last ``keep`` positions only ``(B, keep, V)``: the LM head (a
        49k-token vocabulary for SmolLM2) runs only where it is read (a :data:`fedsplit.eval.scoring.LogitsFn`)."""
        hidden = self._eval_hidden(batch)  # (B, T, H)
        with autocast(self.cfg):
            logits: torch.Tensor = self.tail.output_head()(hidden[:, -keep:] if keep else hidden)
            return logits
