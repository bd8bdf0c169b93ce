from __future__ import annotations

import torch

from fedsplit.attacks.gradients import (
    analytic_label_recovery,
    cut_gradients,
    matching_label_recovery,
    tail_logits,
)
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.optim import causal_lm_loss

from tiny import token_batch


def _parts(model):
    model.requires_grad_(False)
    return split_model(model, 1, 1)


def test_cut_gradients_are_the_unsplit_models_gradients(tiny_llama):
    model, _ = tiny_llama
    parts, batch = _parts(model), token_batch(200, batch=2, length=16)
    mask = batch["attention_mask"]

    grads = cut_gradients(parts, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"]).requires_grad_()
    hidden = parts.head.run_blocks(embeds, mask, positions_from_mask(mask))  # the head's output, kept in the graph
    hidden.retain_grad()
    logits = parts.tail(parts.trunk(hidden, mask, positions_from_mask(mask)), mask, positions_from_mask(mask))
    causal_lm_loss(logits, batch["labels"]).backward()

    torch.testing.assert_close(grads.grad_head, hidden.grad, rtol=1e-4, atol=1e-7)


def test_server_reads_the_labels_from_the_gradient_it_receives(tiny_llama):
    model, _ = tiny_llama
    parts, batch = _parts(model), token_batch(200, batch=2, length=16)
    grads = cut_gradients(parts, batch)
    logits_fn = tail_logits(parts, batch["attention_mask"])

    analytic = analytic_label_recovery(logits_fn, grads.h_trunk, grads.grad_trunk, batch["labels"])
    matched = matching_label_recovery(logits_fn, grads.h_trunk, grads.grad_trunk, batch["labels"], steps=5)

    assert analytic > 0.9 and matched > 0.9  # chance is 1 / 260


def test_a_gradient_unrelated_to_the_labels_reveals_nothing(tiny_llama):
    model, _ = tiny_llama
    parts, batch = _parts(model), token_batch(200, batch=2, length=16)
    grads = cut_gradients(parts, batch)
    noise = torch.randn(grads.grad_trunk.shape, generator=torch.Generator().manual_seed(3))

    recovered = analytic_label_recovery(
        tail_logits(parts, batch["attention_mask"]), grads.h_trunk, noise, batch["labels"]
    )

    assert recovered < 0.1
