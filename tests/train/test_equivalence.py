"""K split steps through the serialized channel equal K centralized steps (issue: split engine, item 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.channel import in_process_channel
from fedsplit.client import SplitClient
from fedsplit.server import TrunkServer
from fedsplit.split import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig


def _batches(steps: int, accum: int, seed: int = 1) -> list[list[dict]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            ids = torch.randint(0, 250, (3, 16), generator=g)
            mask = torch.ones(3, 16, dtype=torch.long)
            mask[1, 11:] = 0
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :5] = -100  # prompt tokens are not supervised
            micro.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out.append(micro)
    return out


def _pair(model, cfg: TrainConfig, steps: int):
    split_copy, central_copy = copy.deepcopy(model), copy.deepcopy(model)
    settings = [LoraSettings(r=4), LoraSettings(r=8, alpha=8), LoraSettings(r=2)]
    parts = split_model(split_copy, 2, 2)
    add_part_adapters(parts, settings, seed=cfg.seed)
    central_parts = split_model(central_copy, 2, 2)
    add_part_adapters(central_parts, settings, seed=cfg.seed)
    server = TrunkServer(parts.trunk, cfg, total_steps=steps)
    channel, _ = in_process_channel("c0", lambda k, r, s, m: server.handle("c0", k, r, s, m))
    client = SplitClient(parts.head, parts.tail, channel, cfg, total_steps=steps)
    central_params = [p for part in central_parts for p in trainable_parameters(part)]
    trainer = CentralizedTrainer(central_copy, central_params, cfg, total_steps=steps)
    split_params = [p for part in parts for p in trainable_parameters(part)]
    return client, trainer, split_params, central_params, channel


CONFIGS = {
    "plain": TrainConfig(lr=1e-2, max_grad_norm=0.0, schedule="constant"),
    "clip+accum+cosine": TrainConfig(lr=1e-2, max_grad_norm=0.05, grad_accum=3, schedule="cosine", warmup_steps=2),
    "linear+wd": TrainConfig(lr=5e-3, weight_decay=0.1, schedule="linear", max_grad_norm=1.0),
    "bf16-autocast": TrainConfig(lr=1e-2, precision="bf16", max_grad_norm=0.05, grad_accum=2),
    "left-padding": TrainConfig(lr=1e-2, padding_side="left"),
    "loss-in-chunks-of-7": TrainConfig(lr=1e-2, loss_chunk_tokens=7, grad_accum=2),
    "bf16+loss-in-chunks-of-5": TrainConfig(lr=1e-2, precision="bf16", loss_chunk_tokens=5),
    "loss-all-at-once": TrainConfig(lr=1e-2, loss_chunk_tokens=0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_five_split_steps_equal_centralized(tiny_llama, name):
    model, _ = tiny_llama
    cfg = CONFIGS[name]
    client, trainer, split_params, central_params, _ = _pair(model, cfg, steps=5)

    for micro in _batches(5, cfg.grad_accum):
        ours, theirs = client.train_step(micro), trainer.train_step(micro)
        assert ours.loss == pytest.approx(theirs.loss, abs=1e-5)
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-5)

    diffs = [float((a - b).detach().abs().max()) for a, b in zip(split_params, central_params, strict=False)]
    assert max(diffs) <= 1e-5
    moved = [float((a - b).detach().abs().max()) for a, b in zip(split_params, _pair(model, cfg, 5)[2], strict=False)]
    assert max(moved) > 1e-4  # training really changed the adapters


def test_clipping_really_clips(tiny_llama):
    model, _ = tiny_llama
    cfg = TrainConfig(lr=1e-2, max_grad_norm=1e-4)
    client, _, _, _, _ = _pair(model, cfg, steps=1)

    result = client.train_step(_batches(1, 1)[0])

    assert result.grad_norm > 1e-4  # so the coefficient applied was < 1 on both sides


@pytest.mark.parametrize("chunk", [0, 7, 128])
def test_split_eval_loss_equals_centralized(tiny_llama, chunk):
    model, _ = tiny_llama
    client, trainer, *_ = _pair(model, TrainConfig(loss_chunk_tokens=chunk), steps=1)
    batches = [m for step in _batches(2, 1) for m in step]

    assert client.eval_loss(batches) == pytest.approx(trainer.eval_loss(batches), abs=1e-6)
