"""Fixtures for the attack tests: tiny models, random token batches, public positions of stories260k."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsplit.attacks.corpus import CutPositions, collect, public_sequences, sequence_batches


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
