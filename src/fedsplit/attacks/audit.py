"""In-run privacy audit: a client attacks its own traffic and keeps only the scores (issue 12, item 4).

After a round, a client calls :func:`audit_batch` on a few of its own batches with its current
head (the one whose outputs it sent): attack (a), nearest-neighbour inversion of the sent hidden
states, and, given an inverter fitted by the operator on public text (:class:`RidgeInverter`,
``RidgeInverter.load``), attack (b). Everything runs locally; only the floats leave the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedsplit.attacks.inversion import Inverter, nearest_tokens, token_recovery
from fedsplit.split.parts import positions_from_mask


@dataclass(frozen=True)
class AuditScores:
    nearest_neighbour: float  # share of the batch's real tokens recovered by attack (a)
    learned: float | None  # the same for attack (b); None without an inverter
    positions: int  # real tokens scored


@torch.no_grad()
def audit_batch(
    head: nn.Module,
    embedding: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    inverter: Inverter | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> AuditScores:
    """Token recovery of attacks (a) and (b) on what ``head`` sends for this batch ``(B, T)``.

    ``noise_std`` is the client's ``privacy.hidden_noise_std``: the audit scores what actually
    went on the wire. ``embedding`` is the model's input embedding matrix ``(V, H)``.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids/attention_mask: expected two equal (B, T) shapes, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    sent = head(input_ids, attention_mask, positions_from_mask(attention_mask))  # (B, T, H)
    if noise_std:
        sent = sent + noise_std * torch.randn(sent.shape, generator=generator, dtype=sent.dtype)
    keep = attention_mask.bool()
    hidden, tokens = sent[keep].float(), input_ids[keep]  # (N, H), (N,)
    nn_score = max(token_recovery(nearest_tokens(hidden, embedding, metric), tokens) for metric in ("cosine", "l2"))
    learned = token_recovery(inverter.predict(hidden), tokens) if inverter is not None else None
    return AuditScores(nn_score, learned, int(tokens.numel()))
