"""The trunk's generation caches: exact over the channel, bounded, and refused with a clear reason."""

from __future__ import annotations

import pytest
import torch

from fedsplit.channel import RemoteError, in_process_channel
from fedsplit.inference import LocalTrunk, SamplingSettings, generate_ids
from fedsplit.inference.remote import RemoteTrunk
from fedsplit.protocol import encode_tensor, pb
from fedsplit.server.generation import GenerationLimits, GenerationService, attach_generation

from .federation import build_model, make_federation

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8]])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    _, parts = build_model()
    clock, version = Clock(), [0]
    service = GenerationService(parts.trunk, GenerationLimits(max_sessions_per_client=2, idle_s=10.0),
                                version=lambda: version[0], clock=clock)
    return parts, service, clock, version


def channel_to(service, client_id="alice"):
    channel, _ = in_process_channel(client_id, lambda kind, r, s, req: service.handle(client_id, kind, r, s, req))
    return channel


def prefill(channel, request_id, hidden=None, max_new=8):
    hidden = torch.randn(1, 6, 64) if hidden is None else hidden
    return channel.call(pb.GENERATE_PREFILL, pb.GeneratePrefill(
        request_id=request_id, hidden=encode_tensor(hidden), attention_mask=encode_tensor(torch.ones(1, 6).bool()),
        position_ids=encode_tensor(torch.arange(6)[None]), max_new_tokens=max_new))


def step(channel, request_id, position=6):
    return channel.call(pb.GENERATE_STEP, pb.GenerateStep(
        request_id=request_id, hidden=encode_tensor(torch.randn(1, 1, 64)),
        position_ids=encode_tensor(torch.tensor([[position]]))))


def test_tokens_through_the_sealed_channel_equal_the_in_process_trunk(served):
    parts, service, _, _ = served
    settings = SamplingSettings(max_new_tokens=12)

    remote = generate_ids(parts.head, parts.tail, RemoteTrunk(channel_to(service)), PROMPT, None, settings)
    local = generate_ids(parts.head, parts.tail, LocalTrunk(parts.trunk), PROMPT, None, settings)

    assert remote.tokens == local.tokens and len(remote.tokens[0]) == 12
    assert service.open_requests == 0  # GENERATE_END dropped the cache


def test_an_evicted_cache_gets_a_clear_error_while_another_request_goes_on(served):
    _, service, clock, _ = served
    alice, bob = channel_to(service, "alice"), channel_to(service, "bob")
    prefill(alice, 1)
    clock.now = 8.0
    prefill(bob, 1)
    clock.now = 15.0  # alice idle for 15 s > 10 s; bob for 7 s

    gone = r"FAILED_PRECONDITION: .*request 1's trunk cache is gone \(evicted after 10 s idle\)"
    with pytest.raises(RemoteError, match=gone):
        step(alice, 1)
    assert step(bob, 1).cached_length == 7


def test_a_cache_of_older_trunk_adapters_is_refused(served):
    _, service, _, version = served
    alice = channel_to(service)
    prefill(alice, 1)
    version[0] += 1  # a training step changed the trunk

    with pytest.raises(RemoteError, match="no longer matches the trunk adapters"):
        step(alice, 1)
    with pytest.raises(RemoteError, match="trunk cache is gone"):
        step(alice, 1)


def test_requests_are_bounded_per_client_in_tokens_and_in_positions(served):
    _, service, _, _ = served
    alice = channel_to(service)
    prefill(alice, 1, max_new=2)
    prefill(alice, 2)

    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED: .*already has 2 open generation requests"):
        prefill(alice, 3)
    step(alice, 1)  # the second token
    with pytest.raises(RemoteError, match="asked for 2 new tokens and has had them"):
        step(alice, 1, position=7)
    with pytest.raises(RemoteError, match=r"expected the next position of every row \[6\], got \[9\]"):
        step(alice, 2, position=9)
    with pytest.raises(RemoteError, match="max_new_tokens: expected 1..1024, got 5000"):
        prefill(alice, 2, max_new=5000)
    with pytest.raises(RemoteError, match="GenerateStep.hidden: expected shape"):
        alice.call(pb.GENERATE_STEP, pb.GenerateStep(request_id=2, hidden=encode_tensor(torch.randn(2, 1, 64)),
                                                     position_ids=encode_tensor(torch.tensor([[6], [6]]))))
    assert alice.call(pb.GENERATE_END, pb.GenerateEnd(request_id=1)).found
    assert not alice.call(pb.GENERATE_END, pb.GenerateEnd(request_id=1)).found


def test_the_coordinator_serves_generation_between_rounds_only_and_a_round_makes_caches_stale():
    fed = make_federation(["a", "spy"], num_rounds=2, local_steps=4, runners_for=["a"], join_grace_s=0.0)
    attach_generation(fed.coordinator)
    spy = fed.connector("spy")()
    prefill(spy, 1)  # before the first round: served

    def probe():
        spy.call(pb.GENERATE_END, pb.GenerateEnd(request_id=2))
        prefill(spy, 2)

    refused = fed.run_probing(probe)

    assert any("generation is served between rounds only" in r for r in refused)
    with pytest.raises(RemoteError, match="no longer matches the trunk adapters"):
        step(spy, 1)
