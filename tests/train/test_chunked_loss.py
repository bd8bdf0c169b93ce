"""The LM head and the loss in chunks of positions: the same loss and gradients, without the batch's logits."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss

B, T, H, V = 3, 11, 8, 50


def _inputs(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 8:] = IGNORE_INDEX  # padding
    return head, hidden, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_loss_and_gradients_equal_the_whole_batch_loss(chunk):
    head, hidden, labels = _inputs()
    expected = causal_lm_loss(head(hidden), labels)
    expected.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    loss.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(hidden.grad, grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, grads[1], atol=1e-6, rtol=1e-5)


def test_no_chunk_holds_the_logits_of_every_supervised_position():
    head, hidden, labels = _inputs()
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, 4).backward()
    assert max(saved) < 4 * V + 1  # the biggest thing kept for backward is one chunk's logits or less
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(head(hidden), labels)
    assert max(saved) >= supervised * V  # the whole-batch loss keeps them all (what the chunks avoid)


def test_no_supervised_token_gives_nan_like_the_whole_batch_loss():
    head, hidden, labels = _inputs()
    labels[:] = IGNORE_INDEX
    assert math.isnan(float(causal_lm_loss(head(hidden), labels)))
    assert math.isnan(float(chunked_causal_lm_loss(hidden, head, labels, 4)))


def test_without_grad_it_runs_plainly():
    head, hidden, labels = _inputs()
    with torch.no_grad():
        loss = chunked_causal_lm_loss(hidden, head, labels, 5)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(causal_lm_loss(head(hidden), labels)), abs=1e-6)


def test_a_chunk_must_hold_a_position():
    head, hidden, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens: expected >= 1, got 0"):
        chunked_causal_lm_loss(hidden, head, labels, 0)
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=-1)
