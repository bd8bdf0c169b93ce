"""The re-run baseline (FL-GLM's generation without caches) gives the cached split generation's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from fedsplit.inference import LocalTrunk, SamplingSettings, iter_tokens
from fedsplit.inference.baseline import rerun_generate, rerun_step
from fedsplit.models import load_model
from fedsplit.split import split_model


@pytest.mark.parametrize("all_logits", [True, False])
def test_rerun_generate_gives_the_cached_greedy_tokens(all_logits):
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])  # (1, T)
    settings = SamplingSettings(max_new_tokens=10)

    cached = [int(t[0]) for t in iter_tokens(parts.head, parts.tail, LocalTrunk(parts.trunk), prompt, None, settings)]
    rerun = rerun_generate(parts.head, parts.tail, parts.trunk, prompt, settings, all_logits=all_logits)

    assert rerun == cached


def test_last_position_logits_equal_every_position_logits_last_row():
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 7]])

    every = rerun_step(parts.head, parts.tail, parts.trunk, ids)
    last = rerun_step(parts.head, parts.tail, parts.trunk, ids, all_logits=False)

    torch.testing.assert_close(last, every)
