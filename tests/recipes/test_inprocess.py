from __future__ import annotations

import copy

import torch

from fedsplit.adapters import LoraSettings, add_part_adapters, trainable_parameters
from fedsplit.client.runner import client_adapters
from fedsplit.data import Example
from fedsplit.recipes.inprocess import round_steps, silo_batches, train_federated
from fedsplit.split import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.config import TrainConfig

CFG = TrainConfig(lr=1e-2, batch_size=2, max_length=32, schedule="cosine")
LORA = [LoraSettings(r=2)] * 3


def _silo(tag: str, n: int) -> list[Example]:
    return [Example.from_pair(f"{tag} question {i}", f"{tag} answer {i % 3}", source=f"t:{i}", id=f"{tag}{i}")
            for i in range(n)]


def test_one_client_one_round_equals_centralized_training(tiny_llama) -> None:
    # Arrange
    model, tokenizer = tiny_llama
    reference = copy.deepcopy(model)
    batches = silo_batches(_silo("a", 6), tokenizer, CFG)

    # Act: the federation of one client, and the unsplit model on the very same steps
    parts, losses = train_federated(model, [batches], CFG, LORA, rounds=1, local_steps=3, progress=False)
    ref_parts = split_model(reference, 1, 1)
    add_part_adapters(ref_parts, LORA, seed=CFG.seed)
    params = [p for part in ref_parts for p in trainable_parameters(part)]
    trainer = CentralizedTrainer(reference, params, CFG, total_steps=3)
    ref_losses = [trainer.train_step(micro).loss for micro in round_steps(batches, CFG, 0, 3)]

    # Assert
    assert len(losses) == 3
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5)
    mine = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(param, mine[name], atol=1e-5), name


def test_federation_is_reproducible_and_every_client_step_trains(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    twin = copy.deepcopy(model)
    silos = [silo_batches(_silo(tag, 4), tokenizer, CFG) for tag in ("a", "b")]

    first, losses = train_federated(model, silos, CFG, LORA, rounds=2, local_steps=1, progress=False)
    second, _ = train_federated(twin, silos, CFG, LORA, rounds=2, local_steps=1, progress=False)

    assert len(losses) == 2 * 1 * 2  # rounds x local steps x clients
    a, b = client_adapters(first.head, first.tail), client_adapters(second.head, second.tail)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(t.abs().sum()) > 0 for k, t in a.items() if "lora_B" in k)  # the clients' parts moved
