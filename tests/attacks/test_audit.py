from __future__ import annotations

import pytest
import torch

from fedsplit.attacks.audit import audit_batch
from fedsplit.attacks.hidden import embedding_matrix, head_of
from fedsplit.attacks.inversion import RidgeInverter

from tiny import token_batch


def test_audit_scores_attacks_a_and_b_on_what_the_head_sends(stories, stories_positions):
    model, _ = stories
    public, private = stories_positions
    inverter = RidgeInverter.fit(public.hidden[4], public.tokens, embedding_matrix(model))
    ids = private.tokens[:96].view(4, 24)  # real text: untrained byte tokens have near-duplicate embeddings
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    plain = audit_batch(head_of(model, 0), embedding_matrix(model), batch["input_ids"], batch["attention_mask"])
    deep = audit_batch(
        head_of(model, 4), embedding_matrix(model), batch["input_ids"], batch["attention_mask"], inverter=inverter
    )

    assert plain.nearest_neighbour > 0.97 and plain.learned is None and plain.positions == 96
    assert deep.learned is not None and deep.learned > deep.nearest_neighbour


def test_audit_sees_the_clients_noise(tiny_llama):
    model, _ = tiny_llama
    batch = token_batch(model.config.vocab_size, batch=16, length=64)

    scores = audit_batch(
        head_of(model, 1),
        embedding_matrix(model),
        batch["input_ids"],
        batch["attention_mask"],
        noise_std=1e3,
        generator=torch.Generator().manual_seed(0),
    )

    assert scores.nearest_neighbour < 0.03


def test_audit_refuses_mismatched_shapes(tiny_llama):
    model, _ = tiny_llama

    with pytest.raises(ValueError, match="two equal"):
        audit_batch(
            head_of(model, 1),
            embedding_matrix(model),
            torch.zeros(2, 3, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.long),
        )
