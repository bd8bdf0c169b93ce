"""The client's federated evaluation and in-run privacy audit (issue 12, items 1 and 4) on tiny models."""

from __future__ import annotations

import pytest
import torch

from fedsplit.attacks.hidden import head_of
from fedsplit.channel import RemoteError
from fedsplit.client.evaluation import PatientChannel, PrivacyAudit
from fedsplit.protocol import pb


def _batches(count: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0  # padding is not scored
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def test_the_audit_recovers_every_token_of_a_p0_head_and_chance_under_huge_noise(tiny_llama):
    # Arrange: p = 0 sends the embeddings themselves, the classic split's worst case
    model, _ = tiny_llama
    head = head_of(model, 0)
    batches = _batches(6, model.config.vocab_size)

    # Act
    plain = PrivacyAudit(samples=3).scores(head, batches, round=1)
    noisy = PrivacyAudit(samples=3, noise_std=1e3).scores(head, batches, round=1)

    # Assert: 3 batches of 4 x 16 positions minus 5 padded each
    assert plain["audit_positions"] == noisy["audit_positions"] == 3 * (64 - 5)
    assert plain["audit_nearest_neighbour"] > 0.97
    assert noisy["audit_nearest_neighbour"] < 0.05
    assert "audit_learned" not in plain


def test_a_patient_channel_waits_out_the_rate_limit_but_not_other_refusals():
    calls = []

    class Limited:
        def call(self, kind, message, *, round=0, step=0):
            calls.append(kind)
            if len(calls) < 3:
                raise RemoteError(pb.RESOURCE_EXHAUSTED, "evaluation rate limit")
            if len(calls) == 3:
                return "reply"
            raise RemoteError(pb.FAILED_PRECONDITION, "between rounds only")

    channel = PatientChannel(Limited(), wait_s=0.0)  # type: ignore[arg-type]

    assert channel.call(pb.FORWARD, pb.Forward()) == "reply" and len(calls) == 3
    with pytest.raises(RemoteError, match="between rounds only"):
        channel.call(pb.FORWARD, pb.Forward())


def test_with_an_inverter_the_audit_scores_the_learned_attack_too(tiny_llama):
    # Arrange: a ridge inverter fitted on other ("public") batches through the same p = 1 head
    from fedsplit.attacks.hidden import embedding_matrix
    from fedsplit.attacks.inversion import RidgeInverter
    from fedsplit.split.parts import positions_from_mask

    model, _ = tiny_llama
    head = head_of(model, 1)
    public = _batches(8, model.config.vocab_size, seed=1)
    with torch.no_grad():
        hidden = torch.cat([head(b["input_ids"], b["attention_mask"], positions_from_mask(b["attention_mask"]))
                            [b["attention_mask"].bool()] for b in public])  # (N, H)
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in public])  # (N,)
    inverter = RidgeInverter.fit(hidden, tokens, embedding_matrix(model))

    # Act
    scores = PrivacyAudit(samples=2, inverter=inverter).scores(head, _batches(4, model.config.vocab_size), round=3)

    # Assert
    assert 0.0 <= scores["audit_learned"] <= 1.0 and 0.0 <= scores["audit_nearest_neighbour"] <= 1.0
    assert scores["audit_positions"] == 2 * (64 - 5)
