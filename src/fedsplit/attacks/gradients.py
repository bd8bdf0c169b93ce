"""What the backward pass leaks: the gradients at the cuts (FL-GLM, arXiv 2406.14898, Alg. 1).

The server RECEIVES dL/dh_trunk (the tail's input gradient, cut 2) and SENDS dL/dh_head (cut 1).
It also knows h_trunk (it computed it) and, worst case, the global tail adapter, so it can evaluate
the tail's Jacobian J = d logits / d h_trunk itself. With a mean cross-entropy loss,

    dL/dh_trunk = J^T (softmax(logits) - onehot(labels)) / N,

linear in the labels, which are the client's response tokens. Two attacks:

* **analytic**: one Jacobian-vector product, ``J @ g``, is about ``J J^T (p - e_y)``; the label is
  the vocabulary entry it pushes down most (argmin), because ``J J^T`` is dominated by the
  diagonal (each token's own unembedding row).
* **gradient matching** (TAG, Deng et al. 2021; LAMP, Balunovic et al. 2022): optimise soft labels
  (plus a "not supervised" class per position) so the gradient they would produce has maximal
  cosine similarity with the observed one; start from the analytic guess.

The same works on dL/dh_head through trunk + tail. Input tokens leak through the forward pass
already (:mod:`fedsplit.attacks.inversion`); this module measures the labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsplit.split.parts import SplitParts, positions_from_mask
from fedsplit.train.optim import IGNORE_INDEX, causal_lm_loss

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # hidden (B, T, H) -> logits (B, T, V)


@dataclass
class CutGradients:
    h_head: torch.Tensor  # (B, T, H) sent at cut 1 (with the client's noise, if any)
    h_trunk: torch.Tensor  # (B, T, H) the trunk's output, sent back at cut 2
    grad_trunk: torch.Tensor  # (B, T, H) dL/dh_trunk: the server receives it
    grad_head: torch.Tensor  # (B, T, H) dL/dh_head: the server sends it


def cut_gradients(
    parts: SplitParts, batch: dict[str, torch.Tensor], noise_std: float = 0.0, generator: torch.Generator | None = None
) -> CutGradients:
    """One split step's tensors at both cuts, exactly as :class:`~fedsplit.client.SplitClient` exchanges them."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions = positions_from_mask(mask)
    with torch.no_grad():
        h_head = parts.head(ids, mask, positions)  # (B, T, H)
        if noise_std:
            h_head = h_head + noise_std * torch.randn(h_head.shape, generator=generator)
    sent = h_head.clone().requires_grad_()
    h_trunk = parts.trunk(sent, mask, positions)  # (B, T, H)
    received = h_trunk.detach().requires_grad_()
    causal_lm_loss(parts.tail(received, mask, positions), labels).backward()
    h_trunk.backward(received.grad)
    return CutGradients(h_head, h_trunk.detach(), received.grad.detach(), sent.grad.detach())


def tail_logits(parts: SplitParts, mask: torch.Tensor) -> LogitsFn:
    positions = positions_from_mask(mask)
    return lambda h: parts.tail(h, mask, positions)


def trunk_tail_logits(parts: SplitParts, mask: torch.Tensor) -> LogitsFn:
    positions = positions_from_mask(mask)
    return lambda h: parts.tail(parts.trunk(h, mask, positions), mask, positions)


def _supervised(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions t whose logits are scored (labels[t+1] != -100) and their targets: (B, T-1) bool, (B, T-1)."""
    targets = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def _double_backward_attention():
    """SDPA's fused CPU kernels have no double backward; the math kernel (same result) has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def analytic_scores(logits_fn: LogitsFn, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``J @ grad``: (B, T, V) directional derivative of the logits along the observed gradient."""
    with _double_backward_attention():
        _, jvp = torch.autograd.functional.jvp(logits_fn, hidden.detach(), grad.detach())
    return jvp


def analytic_label_recovery(
    logits_fn: LogitsFn, hidden: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> float:
    """Share of supervised labels (response tokens) recovered as ``argmin_v (J g)_v`` at each position."""
    scores = analytic_scores(logits_fn, hidden, grad)[:, :-1]  # (B, T-1, V): position t predicts label t+1
    supervised, targets = _supervised(labels)
    return float((scores.argmin(-1)[supervised] == targets[supervised]).float().mean())


def matching_label_recovery(
    logits_fn: LogitsFn,
    hidden: torch.Tensor,
    grad: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 0.1,
) -> float:
    """TAG / LAMP-style: soft labels whose gradient matches the observed one (cosine), then argmax.

    The unknowns per position are V token classes + 1 "not supervised" class (the attacker does not
    know which positions carry a loss); the gradient they imply is ``J^T ((1 - q_none) p - q_tokens)``,
    up to the unknown 1/N that cosine similarity ignores.
    """
    with _double_backward_attention():
        return _match(logits_fn, hidden, grad, labels, steps, lr)


def _match(
    logits_fn: LogitsFn, hidden: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, steps: int, lr: float
) -> float:
    hidden = hidden.detach().requires_grad_()
    logits = logits_fn(hidden)  # (B, T, V)
    probs = logits.detach()[:, :-1].softmax(-1)  # (B, T-1, V)
    with torch.no_grad():
        start = -analytic_scores(logits_fn, hidden, grad)[:, :-1]
        start = 4.0 * start / start.std().clamp_min(1e-12)
    z = torch.cat([start, torch.zeros_like(start[..., :1])], dim=-1).requires_grad_()  # (B, T-1, V+1)
    optimizer = torch.optim.Adam([z], lr=lr)
    target = grad.detach().flatten()
    for _ in range(steps):
        q = z.softmax(-1)
        u = (1.0 - q[..., -1:]) * probs - q[..., :-1]  # (B, T-1, V): dL/dlogits up to 1/N
        u = F.pad(u, (0, 0, 0, 1))  # the last position predicts nothing
        implied = torch.autograd.grad(logits, hidden, grad_outputs=u, retain_graph=True, create_graph=True)[0]
        loss = 1.0 - F.cosine_similarity(implied.flatten(), target, dim=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[z], retain_graph=True)  # the logits graph serves every step
        optimizer.step()
    supervised, targets = _supervised(labels)
    guess = z.detach()[..., :-1].argmax(-1)  # (B, T-1)
    return float((guess[supervised] == targets[supervised]).float().mean())
