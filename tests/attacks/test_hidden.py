from __future__ import annotations

import pytest
import torch

from fedsplit.attacks.hidden import cut_hidden, embedding_matrix, head_of, hidden_by_depth
from fedsplit.split import split_model
from fedsplit.split.parts import positions_from_mask

from tiny import token_batch


def test_depth_zero_is_the_embedding_output(tiny_llama):
    model, _ = tiny_llama
    batch = token_batch(200)

    hidden = cut_hidden(model, 0, batch["input_ids"], batch["attention_mask"])

    assert torch.equal(hidden, embedding_matrix(model)[batch["input_ids"]])


@pytest.mark.parametrize("p", [1, 2, 4])
def test_every_depth_in_one_pass_equals_the_split_head(tiny_llama, p):
    model, _ = tiny_llama
    batch = token_batch(200, pad_last=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    by_depth = hidden_by_depth(model, [0, 1, 2, 4], ids, mask)
    with torch.no_grad():
        expected = split_model(model, p, 1).head(ids, mask, positions_from_mask(mask))

    torch.testing.assert_close(by_depth[p], expected, rtol=0, atol=1e-6)


def test_impossible_depth_is_refused(tiny_llama):
    model, _ = tiny_llama

    with pytest.raises(ValueError, match="expected 0..6"):
        head_of(model, 7)
