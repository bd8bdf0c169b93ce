"""The client's side of a split step: its loss through the trunk, its step, its contract."""

from __future__ import annotations

import pytest
import torch

from fedsplit.recipes.local import local_split
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.config import TrainConfig
from fedsplit.train.optim import causal_lm_loss


def _batch(seed: int = 0, length: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 250, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_eval_loss_through_the_trunk_equals_the_unsplit_model(tiny_llama):
    model, _ = tiny_llama
    pair = local_split(model, TrainConfig(), total_steps=1)
    batch = _batch()
    mask = batch["attention_mask"]

    split_loss = pair.client.eval_loss([batch])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits

    assert split_loss == pytest.approx(float(causal_lm_loss(logits, batch["labels"])), abs=1e-5)


def test_train_step_moves_head_and_tail_and_the_trunk_by_one_step(tiny_llama):
    model, _ = tiny_llama
    pair = local_split(model, TrainConfig(lr=1e-2), total_steps=4)
    before = [p.detach().clone() for p in pair.client.params]

    result = pair.client.train_step([_batch()])

    assert pair.client.steps_taken == 1 and pair.server.steps_taken == 1
    assert result.loss > 0 and result.grad_norm > 0
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(pair.client.params, before, strict=True)) > 1e-4


def test_train_step_needs_exactly_grad_accum_micro_batches(tiny_llama):
    model, _ = tiny_llama
    pair = local_split(model, TrainConfig(grad_accum=2), total_steps=4)

    with pytest.raises(ValueError, match="train_step: expected 2 micro-batches, got 1"):
        pair.client.train_step([_batch()])
