"""The LM head and the loss in chunks of positions: the same loss and gradients, without the batch's logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsplit.train.config import TrainConfig
from fedsplit.train.lm_loss import LinearCrossEntropy, chunked_causal_lm_loss
from fedsplit.train.optim import IGNORE_INDEX, causal_lm_loss

B, T, H, V = 3, 11, 8, 50


class Wrapped(nn.Module):
    """A head that is not a plain ``nn.Linear`` (as a LoRA-wrapped one): the checkpointed path."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(H, V, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


HEADS = {  # name -> (head, is the fused path expected)
    "linear, frozen (a tied head)": lambda: (nn.Linear(H, V, bias=False).requires_grad_(False), True),
    "linear with bias, trained": lambda: (nn.Linear(H, V, bias=True), True),
    "wrapped (checkpointed)": lambda: (Wrapped(bias=True), False),
}


def _inputs(make, seed: int = 0) -> tuple[nn.Module, bool, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head, fused = make()
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 8:] = IGNORE_INDEX  # padding
    return head, fused, hidden, labels


def _grads(hidden: torch.Tensor, head: nn.Module) -> list[torch.Tensor]:
    grads = [hidden.grad] + [p.grad for p in head.parameters() if p.requires_grad]
    out = [g.clone() for g in grads]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("name", HEADS)
def test_loss_and_gradients_equal_the_whole_batch_loss(name, chunk):
    head, _, hidden, labels = _inputs(HEADS[name])
    expected = causal_lm_loss(head(hidden), labels)
    expected.backward()
    want = _grads(hidden, head)

    loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    (2.5 * loss).backward()  # an upstream gradient other than 1 reaches every gradient

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for got, ref in zip(_grads(hidden, head), want, strict=True):
        torch.testing.assert_close(got, 2.5 * ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_the_path_taken_and_what_it_keeps_for_backward(name, monkeypatch):
    head, fused, hidden, labels = _inputs(HEADS[name])
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    calls: list[int] = []
    monkeypatch.setattr(LinearCrossEntropy, "apply", _counting(LinearCrossEntropy.apply, calls))
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, 4).backward()
    assert bool(calls) == fused
    # the biggest thing kept for backward: one chunk's logits, or a trained weight's gradient (V, H)
    assert max(saved) <= max(4 * V, V * H) < supervised * V
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(head(hidden), labels)
    assert max(saved) >= supervised * V  # the whole-batch loss keeps them all (what the chunks avoid)


def _counting(fn, calls: list[int]):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)

    return wrapper


def test_under_bf16_autocast_it_matches_the_autocast_whole_batch_loss():
    head, _, hidden, labels = _inputs(HEADS["linear with bias, trained"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = causal_lm_loss(head(hidden), labels)
        loss = chunked_causal_lm_loss(hidden, head, labels, 4)  # not fused: the head runs in bf16 as above
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_no_supervised_token_gives_nan_like_the_whole_batch_loss():
    for make in HEADS.values():
        head, _, hidden, labels = _inputs(make)
        labels[:] = IGNORE_INDEX
        assert math.isnan(causal_lm_loss(head(hidden), labels).item())
        assert math.isnan(chunked_causal_lm_loss(hidden, head, labels, 4).item())


def test_without_grad_it_runs_plainly():
    for make in HEADS.values():
        head, _, hidden, labels = _inputs(make)
        with torch.no_grad():
            loss = chunked_causal_lm_loss(hidden, head, labels, 5)
            expected = causal_lm_loss(head(hidden), labels)
        assert not loss.requires_grad
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_chunk_must_hold_a_position():
    head, _, hidden, labels = _inputs(HEADS["wrapped (checkpointed)"])
    with pytest.raises(ValueError, match="chunk_tokens: expected >= 1, got 0"):
        chunked_causal_lm_loss(hidden, head, labels, 0)
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=-1)


def test_the_centralized_trainer_reads_the_decoder_and_the_head_the_split_client_reads(tiny_llama):
    import copy

    from peft import LoraConfig, get_peft_model

    from fedsplit.split.prefix import peft_prefix_config
    from fedsplit.train.centralized import CentralizedTrainer
    from fedsplit.train.lm_loss import model_loss_parts

    model, _ = tiny_llama
    decoder, head = model_loss_parts(model)
    assert decoder is model.get_decoder() and head is model.lm_head
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_loss_parts(lora)[0] is lora.get_base_model().get_decoder()
    assert model_loss_parts(get_peft_model(copy.deepcopy(model), peft_prefix_config(2))) is None  # its own forward

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [model.lm_head.weight]  # any parameter: the optimizer is not stepped here
    chunked = CentralizedTrainer(model, params, TrainConfig(loss_chunk_tokens=3), 1).loss(batch)
    whole = CentralizedTrainer(model, params, TrainConfig(loss_chunk_tokens=0), 1).loss(batch)
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)
