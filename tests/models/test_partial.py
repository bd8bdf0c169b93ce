"""Partial loading: each party reads only its parts, and those parts are the full model's, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsplit.adapters import LoraSettings, adapter_state_dict, add_part_adapters
from fedsplit.models import ModelLoadError, load_model
from fedsplit.models.partial import load_parts, load_role_parts, weights_dir
from fedsplit.split import positions_from_mask, split_model

LORA = [LoraSettings(r=2), LoraSettings(r=4), LoraSettings(r=2)]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])  # gpt2: learned positions, tied LM head
def saved(request, tmp_path_factory) -> Path:
    model, tokenizer = load_model(request.param, seed=7)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return ids, mask, positions_from_mask(mask)


def _meta(module: torch.nn.Module) -> bool:
    return all(p.is_meta for name, p in module.named_parameters() if "lora_" not in name)


def test_partially_loaded_parts_give_bitwise_the_full_models_outputs(saved):
    full = split_model(load_model(saved)[0], 2, 1)
    _, client = load_parts(str(saved), 2, 1, hold=("head", "tail"))
    _, server = load_parts(str(saved), 2, 1, hold=("trunk",))
    ids, mask, positions = _batch()

    with torch.no_grad():
        h1_full, h1 = full.head(ids, mask, positions), client.head(ids, mask, positions)
        h2_full, h2 = full.trunk(h1_full, mask, positions), server.trunk(h1, mask, positions)
        logits_full, logits = full.tail(h2_full, mask, positions), client.tail(h2, mask, positions)

    assert torch.equal(h1, h1_full) and torch.equal(h2, h2_full) and torch.equal(logits, logits_full)


def test_each_party_holds_only_its_parts(saved):
    _, client = load_parts(str(saved), 2, 1, hold=("head", "tail"))
    _, server = load_parts(str(saved), 2, 1, hold=("trunk",))

    assert _meta(client.trunk) and not any(p.is_meta for p in [*client.head.parameters(), *client.tail.parameters()])
    assert _meta(server.head) and _meta(server.tail) and not any(p.is_meta for p in server.trunk.parameters())


def test_tied_lm_head_is_one_tensor_with_the_embeddings_on_the_client(saved):
    _, client = load_parts(str(saved), 2, 1, hold=("head", "tail"))
    embed = client.head.get_submodule(client.head.spec.embed).weight
    lm_head = client.tail.get_submodule(client.tail.spec.lm_head).weight

    assert (lm_head is embed) == bool(client.tail.config.tie_word_embeddings)
    _, tail_only = load_parts(str(saved), 2, 1, hold=("tail",))  # the LM head alone: read from the embedding
    assert torch.equal(tail_only.tail.get_submodule(tail_only.tail.spec.lm_head).weight, lm_head)


def test_role_parts_start_from_the_same_adapters_as_the_full_model(saved):
    full = split_model(load_model(saved)[0], 2, 1)
    add_part_adapters(full, LORA, seed=5)
    _, server = load_role_parts(str(saved), 2, 1, "server", LORA, seed=5)
    _, client = load_role_parts(str(saved), 2, 1, "client", LORA, seed=5)

    for name in ("head", "trunk", "tail"):
        expected = adapter_state_dict(getattr(full, name))
        got = adapter_state_dict(getattr(server, name))  # the server keeps the global head/tail adapters too
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(torch.equal(adapter_state_dict(full.head)[k], v) for k, v in adapter_state_dict(client.head).items())
    assert not adapter_state_dict(client.trunk)  # no trunk adapter on a client


def test_models_without_a_checkpoint_are_loaded_whole():
    assert weights_dir("tiny-llama") is None
    _, parts = load_parts("tiny-llama", 1, 1, hold=("head", "tail"))

    assert not any(p.is_meta for p in parts.trunk.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="hold: expected parts among"):
        load_parts("tiny-llama", 1, 1, hold=("embeddings",))
    with pytest.raises(ValueError, match="role: expected one of client, server"):
        load_role_parts("tiny-llama", 1, 1, "observer", LORA)


def test_a_client_needs_no_trunk_weights_on_its_disk(saved, tmp_path):
    """A checkpoint holding only the client's tensors is enough: the trunk's never reach the client."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    layers = "transformer.h." if "transformer.wte.weight" in tensors else "model.layers."
    trunk_blocks = tuple(f"{layers}{index}." for index in range(2, 5))  # cut 2 | 3 | 1 of 6 blocks
    client_only = {key: value for key, value in tensors.items() if not key.startswith(trunk_blocks)}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / name, tmp_path / name)
    save_file(client_only, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids, mask, positions = _batch()

    _, reference = load_parts(str(saved), 2, 1, hold=("head", "tail"))
    _, client = load_parts(str(tmp_path), 2, 1, hold=("head", "tail"))

    assert len(client_only) < len(tensors)
    with torch.no_grad():
        assert torch.equal(client.head(ids, mask, positions), reference.head(ids, mask, positions))
    with pytest.raises(ModelLoadError, match="the checkpoint lacks"):
        load_parts(str(tmp_path), 2, 1, hold=("trunk",))
