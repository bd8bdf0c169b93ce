"""Client-batching for inference: several requests' steps in one trunk pass give each request its own answer."""

from __future__ import annotations

import threading

import pytest
import torch

from fedsplit.channel import in_process_channel
from fedsplit.inference import LocalTrunk, SamplingSettings, generate_ids
from fedsplit.inference.cached import PartCache, run_blocks_cached
from fedsplit.inference.remote import RemoteTrunk
from fedsplit.server.generation import GenerationService
from fedsplit.server.generation_batch import StepItem, combine, split_back

from .federation import build_model


def prefilled(trunk, length: int, batch: int, seed: int) -> tuple[PartCache, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = PartCache(trunk)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :2] = False  # some left padding of its own
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        run_blocks_cached(trunk, torch.randn(batch, length, 64, generator=g), mask, positions, state)
    return state, positions[:, -1:] + 1


def _prefixed_parts():
    from fedsplit.models import load_model
    from fedsplit.split import split_model
    from fedsplit.split.prefix import add_part_prefixes

    model, _ = load_model("tiny-llama")  # 256 positions, full attention: steps can be batched
    parts = split_model(model, 1, 1)
    # every cache starts with 3 prefix slots (N(0, 1): far from zero); the left padding goes before them
    add_part_prefixes(parts, 3, seed=4, init_std=1.0)
    return parts


def _parts(method: str):
    return build_model()[1] if method == "lora" else _prefixed_parts()


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_one_pass_over_padded_caches_equals_each_step_alone(method):
    trunk = _parts(method).trunk
    width = 3 if method == "prefix" else 0  # P prefix slots at the start of every cache
    items, alone = [], []
    for length, batch, seed in ((5, 1, 0), (11, 2, 1), (8, 1, 2)):
        state, position = prefilled(trunk, length, batch, seed)
        twin, _ = prefilled(trunk, length, batch, seed)
        hidden = torch.randn(batch, 1, 64, generator=torch.Generator().manual_seed(10 + seed))
        items.append(StepItem(state, hidden, position))
        with torch.no_grad():
            alone.append((run_blocks_cached(trunk, hidden, twin.step_mask(), position, twin), twin))

    with torch.no_grad():
        combined, hidden, positions = combine(trunk, items)  # padding before each row's prefix, masked
        output = run_blocks_cached(trunk, hidden, combined.step_mask(), positions, combined)
        split_back(trunk, combined, output, items)

    assert combined.length == width + 11 + 1
    for item, (expected, twin) in zip(items, alone, strict=True):
        torch.testing.assert_close(item.output, expected, atol=1e-5, rtol=0)
        assert torch.equal(item.state.mask, twin.mask) and item.state.mask[:, :width].all()
        for layer in trunk.layer_indices:
            for kind in ("keys", "values"):
                torch.testing.assert_close(getattr(item.state.cache.layers[layer], kind),
                                           getattr(twin.cache.layers[layer], kind), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_concurrent_clients_share_trunk_passes_and_each_gets_its_own_greedy_tokens(method):
    parts = _parts(method)
    service = GenerationService(parts.trunk)
    prompts = [torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 9, 6, 12)]
    settings = SamplingSettings(max_new_tokens=16)
    results: dict[int, list[int]] = {}

    def client(index: int) -> None:
        cid = f"c{index}"
        channel, _ = in_process_channel(cid, lambda kind, r, s, req: service.handle(cid, kind, r, s, req))
        results[index] = generate_ids(parts.head, parts.tail, RemoteTrunk(channel), prompts[index], None,
                                      settings).tokens[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    for index, prompt in enumerate(prompts):
        alone = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), prompt, None, settings).tokens[0]
        assert results[index] == alone
    assert service._batcher is not None and service._batcher.widest >= 2
