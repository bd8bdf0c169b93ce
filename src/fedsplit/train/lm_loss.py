"""The LM head and the causal-LM loss in chunks of positions: the batch's logits are never held at once.

A split client (FL-GLM, arXiv 2406.14898) owns the tail, so it runs the LM head and the loss. With a
large vocabulary and a small model that is the client's largest memory: for SmolLM2-135M (49,152
tokens) at batch 4 x 128 the logits, their log-softmax and their gradient are ~96 MiB each, more
than the two tail blocks' weights. :func:`chunked_causal_lm_loss` scores only the positions whose
next token is supervised, ``chunk_tokens`` at a time:

* a plain ``nn.Linear`` head at full precision (SmolLM2's tied head, GPT-2's, any untied one)
  goes through :class:`LinearCrossEntropy`, which computes each chunk's loss *and* its gradients in
  the forward pass and keeps only the gradients (``(N, H)`` for the rows; ``(V, H)`` for the weight
  only when it trains): the same arithmetic as logits -> cross-entropy -> backward, no recomputation;
* any other head (a LoRA-wrapped one, or under bf16 autocast) runs each chunk under
  ``torch.utils.checkpoint``: its logits are recomputed in the backward pass (one more LM-head
  forward per step) instead of being kept.

Both equal :func:`fedsplit.train.optim.causal_lm_loss` up to float rounding (tested to 1e-6).
Written here because no maintained CPU implementation exists: Liger-Kernel's fused linear
cross-entropy, which this follows, is a Triton kernel for GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsplit.train.optim import IGNORE_INDEX


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i cross_entropy(rows_i @ weight.T + bias, targets_i)``, gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        grad_rows = torch.empty_like(rows)  # (N, H)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # (V, H)
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_tokens):
            h, y = rows[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            logits = F.linear(h, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
            grad[torch.arange(y.shape[0]), y] -= 1.0  # d(sum of losses) / d(logits)
            grad = grad.to(h.dtype)
            grad_rows[start:start + chunk_tokens] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ h
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.to(grad_rows.dtype)
        return (grad_rows * scale, None if grad_weight is None else grad_weight * scale,
                None if grad_bias is None else grad_bias * scale, None, None)


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor],
                           labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """:func:`~fedsplit.train.optim.causal_lm_loss` of ``lm_head(hidden)`` (``hidden`` ``(B, T, H)``: what the
    LM head reads, after the final norm), ``chunk_tokens`` supervised positions at a time (module docstring).
    The mean over supervised tokens; NaN when none is supervised, as there."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected >= 1, got {chunk_tokens!r}")
    targets = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # (N, H): positions whose next token is supervised
    targets = targets[keep]  # (N,)
    trains = isinstance(lm_head, nn.Module) and any(p.requires_grad for p in lm_head.parameters())
    grads = torch.is_grad_enabled() and (rows.requires_grad or trains)
    if grads and type(lm_head) is nn.Linear and not torch.is_autocast_enabled(rows.device.type):
        total = LinearCrossEntropy.apply(rows, lm_head.weight, lm_head.bias, targets, chunk_tokens)
        return total / targets.numel()
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        h, y = rows[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        # with gradients, each chunk's logits are recomputed in backward instead of kept
        total = total + (checkpoint(_chunk_sum, lm_head, h, y, use_reentrant=False) if grads
                         else _chunk_sum(lm_head, h, y))
    return total / targets.numel()


def _chunk_sum(lm_head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of one chunk of rows ``(c, H)`` (its logits ``(c, V)`` live only in here)."""
    return F.cross_entropy(lm_head(h).float(), y, reduction="sum")


def model_loss_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(the decoder whose ``last_hidden_state`` the LM head reads, the LM head) of an unsplit Hugging Face
    causal LM (LoRA-wrapped by PEFT or not), for :func:`chunked_causal_lm_loss`; None when the model must run
    its own forward (a PEFT prompt-learning model: its forward injects the prefixes)."""
    peft: Any = model
    if getattr(peft, "peft_config", None) is not None and hasattr(peft, "get_base_model"):
        if getattr(peft, "active_peft_config", None) is not None and peft.active_peft_config.is_prompt_learning:
            return None
        model = peft.get_base_model()
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    return None if decoder is None or head is None else (decoder, head)
