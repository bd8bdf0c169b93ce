"""Fixtures for the attack tests: tiny models, random token batches, public positions of stories260k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsplit.attacks.corpus import CutPositions, collect, public_sequences, sequence_batches


def token_batch(
    vocab: int, batch: int = 8, length: int = 32, seed: int = 0, pad_last: int = 0
) -> dict[str, torch.Tensor]:
    """Random tokens (B, T), the last ``pad_last`` positions of row 0 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[0, -pad_last:] = 0
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the "prompt" carries no loss
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="session")
def stories(shared_data: Path):
    """The real pretrained stories260k (read from the shared data; skipped when absent)."""
    from fedsplit.models import load_model

    model, tokenizer = load_model("stories260k")
    model.requires_grad_(False)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def stories_positions(stories, shared_data: Path) -> tuple[CutPositions, CutPositions]:
    """Public (fit) and held-apart (attacked) positions of real text through stories260k, p = 0, 2, 4."""
    model, tokenizer = stories
    sequences = public_sequences(tokenizer, shared_data, 5000, 32)
    cut = int(len(sequences) * 0.8)
    pad = tokenizer.pad_token_id or 0
    public = collect(model, [0, 2, 4], sequence_batches(sequences[:cut], 16, pad))
    private = collect(model, [0, 2, 4], sequence_batches(sequences[cut:], 16, pad))
    return public, private
