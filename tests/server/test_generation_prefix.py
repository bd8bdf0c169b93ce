"""The server's generation caches with a P-tuning v2 trunk: exact over the channel, batched, bounded, current."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.inference import LocalTrunk, SamplingSettings, generate_ids
from fedsplit.inference.remote import RemoteTrunk
from fedsplit.models import load_model
from fedsplit.protocol import decode_tensor, encode_tensor, pb
from fedsplit.server.generation import GenerationService, attach_generation
from fedsplit.split import split_model
from fedsplit.split.prefix import add_part_prefixes

from tiny import token_batches

P = 3


def prefixed(seed: int = 4):
    model, _ = load_model("tiny-llama")  # 256 positions, full attention: steps can be batched
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, P, seed=seed, init_std=1.0)  # far from zero, as trained prefixes can be
    return parts


def channel_to(service, client_id="alice"):
    channel, _ = in_process_channel(client_id, lambda kind, r, s, req: service.handle(client_id, kind, r, s, req))
    return channel


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_tokens_through_the_channel_equal_the_in_process_prefixed_trunk():
    parts = prefixed()
    service = GenerationService(parts.trunk)
    ids, mask = left_padded()
    settings = SamplingSettings(max_new_tokens=12)

    remote = generate_ids(parts.head, parts.tail, RemoteTrunk(channel_to(service)), ids, mask, settings)
    local = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, mask, settings)

    assert remote.tokens == local.tokens and len(remote.tokens[0]) == 12
    assert service.open_requests == 0


def prefill(channel, length: int, request_id: int = 1, hidden: torch.Tensor | None = None):
    hidden = torch.randn(1, length, 64) if hidden is None else hidden
    return channel.call(pb.GENERATE_PREFILL, pb.GeneratePrefill(
        request_id=request_id, hidden=encode_tensor(hidden),
        attention_mask=encode_tensor(torch.ones(1, length).bool()),
        position_ids=encode_tensor(torch.arange(length)[None]), max_new_tokens=4))


def test_the_trunk_cache_counts_its_prefix_and_a_prompt_that_does_not_fit_after_it_is_refused():
    service = GenerationService(prefixed().trunk)
    alice = channel_to(service)

    assert prefill(alice, 6).cached_length == P + 6
    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: .*a prompt of 253 positions does not fit the "
                                          "trunk's cache of 256 after the trunk's 3 prefix positions"):
        prefill(alice, 256 - P, request_id=2)
    assert prefill(alice, 256 - P - 1, request_id=3).cached_length == 255
    step = pb.GenerateStep(request_id=3, hidden=encode_tensor(torch.randn(1, 1, 64)),
                           position_ids=encode_tensor(torch.tensor([[252]])))
    assert alice.call(pb.GENERATE_STEP, step).cached_length == 256  # the new token fits: offset position 255
    step.position_ids.CopyFrom(encode_tensor(torch.tensor([[253]])))
    with pytest.raises(RemoteError, match="would cache 257 positions; the limit is 256"):
        alice.call(pb.GENERATE_STEP, step)


def test_between_rounds_the_service_serves_the_trained_prefixes_and_a_training_step_makes_caches_stale():
    from fedsplit.recipes.local import local_split
    from fedsplit.train.config import TrainConfig

    model, _ = load_model("tiny-llama")
    local = local_split(model, TrainConfig(lr=5e-2, warmup_steps=0), 4, prefix_tokens=P, seed=4)
    parts = local.parts
    coordinator = SimpleNamespace(trunk=local.server, completed_round=0)  # what attach_generation reads
    service = attach_generation(coordinator)
    alice = channel_to(service)
    ids, mask = left_padded()
    settings = SamplingSettings(max_new_tokens=6)
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    before = decode_tensor(prefill(alice, 6, hidden=hidden).hidden, "before")

    local.client.train_step(token_batches(1, 2, seed=0))  # the trunk server trains the trunk's prefixes

    with pytest.raises(RemoteError, match="no longer matches the trunk adapters"):
        alice.call(pb.GENERATE_STEP, pb.GenerateStep(request_id=1, hidden=encode_tensor(torch.randn(1, 1, 64)),
                                                     position_ids=encode_tensor(torch.tensor([[6]]))))
    after = decode_tensor(prefill(alice, 6, request_id=2, hidden=hidden).hidden, "after")
    assert (after - before).abs().max() > 1e-3  # a new prefill reads the trained prefixes
    remote = generate_ids(parts.head, parts.tail, RemoteTrunk(alice), ids, mask, settings)
    local_tokens = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), ids, mask, settings)
    assert remote.tokens == local_tokens.tokens
