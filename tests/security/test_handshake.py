"""Authenticated key agreement: success, and every rejection rule of the verifier and the client."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest

from fedsplit.security.errors import (
    BadSignatureError,
    ConfigMismatchError,
    HandshakeError,
    KeyAgreementError,
    KeyMismatchError,
    MalformedHandshakeError,
    ProtocolVersionError,
    ReplayCacheFullError,
    ReplayedHelloError,
    RevokedError,
    RunMismatchError,
    ServerAuthenticationError,
    StaleHandshakeError,
    UnknownClientError,
)
from fedsplit.security.handshake import MAX_CONFIG_SECTIONS, finish_client, hash_config_sections, hash_run_config
from fedsplit.security.identity import fingerprint, generate_identity, short_fingerprint
from fedsplit.security.wire import PROTOCOL_VERSION, Role

from .conftest import World
from .helpers import RUN_ID, FakeClock, flip_bit

# --- success ---------------------------------------------------------------------------------


def test_both_sides_derive_identical_keys(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    pending = world.hello()

    # Act
    server_hello, server_keys = verifier.accept(pending.hello)
    client_keys = world.finish(pending, server_hello)

    # Assert
    assert client_keys == server_keys
    assert client_keys.client_to_server != client_keys.server_to_client
    assert (client_keys.run_id, client_keys.client_id) == (RUN_ID, "alice")


def test_every_session_gets_fresh_keys(world: World) -> None:
    # Arrange
    verifier = world.verifier()

    # Act
    keys = []
    for _ in range(2):
        pending = world.hello()
        server_hello, _ = verifier.accept(pending.hello)
        keys.append(world.finish(pending, server_hello))

    # Assert
    first, second = keys
    assert first.session_id != second.session_id
    assert {first.client_to_server, first.server_to_client}.isdisjoint(
        {second.client_to_server, second.server_to_client}
    )


def test_derived_sessions_talk_to_each_other(world: World) -> None:
    # Arrange
    pending = world.hello()
    server_hello, server_keys = world.verifier().accept(pending.hello)
    client_keys = world.finish(pending, server_hello)
    client, server = client_keys.session(Role.CLIENT), server_keys.session(Role.SERVER)

    # Act
    up = client.seal(1, 0, 0, b"hidden states")
    down = server.seal(2, 0, 0, b"gradients")

    # Assert
    assert server.open(1, 0, 0, up.seq, up.ciphertext) == b"hidden states"
    assert client.open(2, 0, 0, down.seq, down.ciphertext) == b"gradients"


def test_keys_are_not_printed(world: World) -> None:
    # Arrange
    pending = world.hello()
    _, keys = world.verifier().accept(pending.hello)

    # Act
    text = repr(keys) + repr(pending)

    # Assert
    assert repr(keys.client_to_server) not in text
    assert "ephemeral_private" not in text


# --- server-side rejections, in the verifier's order -----------------------------------------


def test_wrong_protocol_version_is_rejected(world: World) -> None:
    # Arrange
    pending = world.hello(protocol_version=PROTOCOL_VERSION + 1)

    # Act / Assert
    expected = f"'alice' speaks protocol version {PROTOCOL_VERSION + 1}"
    with pytest.raises(ProtocolVersionError, match=expected):
        world.verifier().accept(pending.hello)


def test_unknown_client_is_rejected_with_its_fingerprint(world: World) -> None:
    # Arrange
    mallory = generate_identity()
    pending = world.hello(client_id="mallory", identity=mallory)

    # Act / Assert
    with pytest.raises(UnknownClientError) as info:
        world.verifier().accept(pending.hello)
    assert "'mallory'" in str(info.value)
    assert short_fingerprint(mallory.public_key()) in str(info.value)


def test_admitted_id_with_a_different_key_is_rejected(world: World) -> None:
    # Arrange: bob claims to be alice, signing with his own key
    pending = world.hello(client_id="alice", identity=world.bob)

    # Act / Assert
    with pytest.raises(KeyMismatchError) as info:
        world.verifier().accept(pending.hello)
    assert short_fingerprint(world.bob.public_key()) in str(info.value)
    assert short_fingerprint(world.alice.public_key()) in str(info.value)


@pytest.mark.parametrize("by", ["id", "fingerprint", "FINGERPRINT"])
def test_revoked_client_is_rejected(world: World, by: str) -> None:
    # Arrange
    entry = {
        "id": "alice",
        "fingerprint": fingerprint(world.alice.public_key()),
        "FINGERPRINT": fingerprint(world.alice.public_key()).upper(),
    }[by]
    verifier = world.verifier(revoked={entry})

    # Act / Assert
    with pytest.raises(RevokedError, match="client 'alice'.* is revoked"):
        verifier.accept(world.hello().hello)
    verifier.accept(world.hello(client_id="bob").hello)  # others unaffected


def test_revocation_at_runtime_blocks_the_next_handshake(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    verifier.accept(world.hello().hello)

    # Act
    verifier.revoke("alice")

    # Assert
    with pytest.raises(RevokedError):
        verifier.accept(world.hello().hello)


def test_tampered_signature_is_rejected(world: World) -> None:
    # Arrange
    hello = world.hello().hello
    forged = dataclasses.replace(hello, signature=flip_bit(hello.signature, 10))

    # Act / Assert
    with pytest.raises(BadSignatureError, match="'alice'.*invalid signature"):
        world.verifier().accept(forged)


@pytest.mark.parametrize(
    "field, value",
    [
        ("timestamp", 1.0),
        ("ephemeral_key", bytes(range(32))),
        ("nonce", bytes(32)),
        ("run_id", "other-run"),
        ("config_hash", bytes(32)),
    ],
)
def test_any_field_changed_after_signing_breaks_the_signature(
    world: World, field: str, value: object
) -> None:
    # Arrange
    altered = dataclasses.replace(world.hello().hello, **{field: value})

    # Act / Assert
    with pytest.raises(BadSignatureError):
        world.verifier().accept(altered)


def test_unsigned_hello_is_rejected(world: World) -> None:
    # Arrange
    unsigned = dataclasses.replace(world.hello().hello, signature=b"")

    # Act / Assert
    with pytest.raises(BadSignatureError):
        world.verifier().accept(unsigned)


@pytest.mark.parametrize("offset, word", [(-61.0, "stale"), (+61.0, "future")])
def test_timestamp_outside_the_window_is_rejected(world: World, offset: float, word: str) -> None:
    # Arrange: the client's clock is off by more than max_skew_s = 60
    hello = world.hello(clock=FakeClock(world.clock.now + offset)).hello

    # Act / Assert
    with pytest.raises(StaleHandshakeError, match=word):
        world.verifier().accept(hello)


@pytest.mark.parametrize("offset", [-60.0, +60.0])
def test_timestamp_at_the_window_edge_is_accepted(world: World, offset: float) -> None:
    # Arrange
    hello = world.hello(clock=FakeClock(world.clock.now + offset)).hello

    # Act
    server_hello, _ = world.verifier().accept(hello)

    # Assert
    assert server_hello.timestamp == world.clock.now


def test_replayed_hello_is_rejected(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    hello = world.hello().hello
    verifier.accept(hello)
    world.clock.now += 30

    # Act / Assert
    with pytest.raises(ReplayedHelloError, match="'alice'.*replayed"):
        verifier.accept(hello)


def test_replay_after_the_window_is_rejected_as_stale(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    hello = world.hello().hello
    verifier.accept(hello)
    world.clock.now += 61

    # Act / Assert
    with pytest.raises(StaleHandshakeError):
        verifier.accept(hello)


def test_clock_stepping_back_does_not_reopen_the_window(world: World) -> None:
    # Arrange: accept, let the nonce be forgotten, then step the server clock back
    verifier = world.verifier()
    hello = world.hello().hello
    verifier.accept(hello)
    start = world.clock.now
    world.clock.now = start + 200
    verifier.accept(world.hello(client_id="bob").hello)  # triggers eviction
    world.clock.now = start

    # Act / Assert
    with pytest.raises(StaleHandshakeError):
        verifier.accept(hello)


def test_only_one_of_many_concurrent_replays_succeeds(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    hello = world.hello().hello
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            verifier.accept(hello)
            outcomes.append("ok")
        except ReplayedHelloError:
            outcomes.append("replay")

    threads = [threading.Thread(target=attempt) for _ in range(8)]

    # Act
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert sorted(outcomes) == ["ok"] + ["replay"] * 7


def test_badly_signed_copy_does_not_burn_the_nonce(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    hello = world.hello().hello
    forged = dataclasses.replace(hello, signature=flip_bit(hello.signature, 0))
    with pytest.raises(BadSignatureError):
        verifier.accept(forged)

    # Act
    server_hello, _ = verifier.accept(hello)

    # Assert
    assert server_hello.signature


def test_full_replay_cache_fails_closed(world: World) -> None:
    # Arrange
    verifier = world.verifier(replay_cache_size=2)
    verifier.accept(world.hello().hello)
    verifier.accept(world.hello().hello)

    # Act / Assert
    with pytest.raises(ReplayCacheFullError, match="retry later"):
        verifier.accept(world.hello().hello)
    world.clock.now += 61  # the window moves on, old nonces are forgotten
    verifier.accept(world.hello().hello)


def test_config_hash_mismatch_names_both_hashes(world: World) -> None:
    # Arrange
    client_hash = hash_run_config({"model": "tiny-llama", "split": [2, 3]})
    hello = world.hello(config_hash=client_hash).hello

    # Act / Assert
    with pytest.raises(ConfigMismatchError) as info:
        world.verifier().accept(hello)
    message = str(info.value)
    assert "configuration mismatch" in message and "'alice'" in message
    assert client_hash.hex()[:16] in message and world.config_hash.hex()[:16] in message


def test_run_id_mismatch_is_rejected_when_the_server_names_its_run(world: World) -> None:
    # Arrange
    verifier = world.verifier(run_id="run-002")

    # Act / Assert
    with pytest.raises(RunMismatchError, match="'run-001'.*'run-002'"):
        verifier.accept(world.hello().hello)


def test_low_order_ephemeral_key_is_rejected(world: World) -> None:
    # Arrange: a correctly signed hello whose X25519 key is the all-zero (low-order) point
    unsigned = dataclasses.replace(world.hello().hello, ephemeral_key=bytes(32), signature=b"")
    hello = dataclasses.replace(unsigned, signature=world.alice.sign(unsigned.transcript_bytes()))

    # Act / Assert
    with pytest.raises(KeyAgreementError):
        world.verifier().accept(hello)


# --- client-side checks ----------------------------------------------------------------------


def test_man_in_the_middle_with_its_own_key_is_rejected(world: World) -> None:
    # Arrange: mallory runs a verifier with her own identity and relays alice's hello to it
    mallory = generate_identity()
    pending = world.hello()
    forged_reply, _ = world.verifier(server_identity=mallory).accept(pending.hello)

    # Act / Assert
    with pytest.raises(ServerAuthenticationError, match="man in the middle") as info:
        finish_client(pending, forged_reply, world.server.public_key(), clock=world.clock)
    assert short_fingerprint(mallory.public_key()) in str(info.value)


def test_man_in_the_middle_claiming_the_pinned_key_fails_the_signature(world: World) -> None:
    # Arrange: mallory writes the real server key into the reply but can only sign with hers
    mallory = generate_identity()
    pending = world.hello()
    reply, _ = world.verifier(server_identity=mallory).accept(pending.hello)
    lying = dataclasses.replace(reply, identity_key=world.server.public_key().public_bytes_raw())

    # Act / Assert
    with pytest.raises(ServerAuthenticationError, match="does not verify under the pinned key"):
        finish_client(pending, lying, world.server.public_key(), clock=world.clock)


def test_server_reply_to_another_hello_is_rejected(world: World) -> None:
    # Arrange
    verifier = world.verifier()
    first, second = world.hello(), world.hello()
    reply_to_first, _ = verifier.accept(first.hello)

    # Act / Assert
    with pytest.raises(ServerAuthenticationError):
        finish_client(second, reply_to_first, world.server.public_key(), clock=world.clock)


def test_stale_server_reply_is_rejected(world: World) -> None:
    # Arrange
    pending = world.hello()
    reply, _ = world.verifier().accept(pending.hello)

    # Act / Assert
    with pytest.raises(StaleHandshakeError, match="server timestamp"):
        world.finish(pending, reply, clock=FakeClock(world.clock.now + 120))


# --- message validation and encoding ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("timestamp", math.nan),
        ("timestamp", math.inf),
        ("identity_key", b"short"),
        ("nonce", bytes(31)),
        ("signature", bytes(63)),
        ("client_id", "../alice"),
        ("run_id", ""),
        ("protocol_version", -1),
    ],
)
def test_malformed_hello_fields_are_rejected_at_construction(
    world: World, field: str, value: object
) -> None:
    # Arrange
    hello = world.hello().hello

    # Act / Assert
    with pytest.raises(MalformedHandshakeError, match=field):
        dataclasses.replace(hello, **{field: value})


def test_transcript_encoding_is_injective_across_field_boundaries(world: World) -> None:
    # Arrange
    hello = world.hello().hello
    a = dataclasses.replace(hello, run_id="ab", client_id="c")
    b = dataclasses.replace(hello, run_id="a", client_id="bc")

    # Act / Assert
    assert a.transcript_bytes() != b.transcript_bytes()
    assert hello.transcript_bytes() == dataclasses.replace(hello).transcript_bytes()


def test_run_config_hash_ignores_key_order_but_not_values() -> None:
    # Arrange
    config = {"model": "m", "split": [1, 3], "lora": {"r": 8, "alpha": 16}}
    reordered = {"lora": {"alpha": 16, "r": 8}, "split": [1, 3], "model": "m"}

    # Act / Assert
    assert hash_run_config(config) == hash_run_config(reordered)
    assert hash_run_config(config) != hash_run_config({**config, "split": [1, 4]})
    with pytest.raises(ValueError, match="canonical JSON"):
        hash_run_config({"lr": math.nan})


def test_every_handshake_error_is_a_handshake_error() -> None:
    families = (ProtocolVersionError, UnknownClientError, StaleHandshakeError, ReplayedHelloError)
    for error in families:
        assert issubclass(error, HandshakeError)
    assert issubclass(MalformedHandshakeError, ValueError)



def test_checks_run_in_the_documented_order(world: World) -> None:
    # Arrange: hellos that break two rules at once; the earlier rule must be reported
    hello = world.hello().hello
    forged = dataclasses.replace(hello, signature=flip_bit(hello.signature, 1))
    stale_and_mismatched = world.hello(
        config_hash=bytes(32), clock=FakeClock(world.clock.now - 600)
    ).hello

    # Act / Assert
    with pytest.raises(BadSignatureError):  # signature before revocation: a stranger cannot learn it
        world.verifier(revoked={"alice"}).accept(forged)
    with pytest.raises(RevokedError):  # the key holder is told
        world.verifier(revoked={"alice"}).accept(hello)
    with pytest.raises(StaleHandshakeError):  # freshness before configuration
        world.verifier().accept(stale_and_mismatched)
    with pytest.raises(ProtocolVersionError):  # version before everything
        world.verifier(protocol_version=PROTOCOL_VERSION + 1, admitted={}).accept(hello)


def test_one_admitted_client_cannot_fill_the_replay_cache_for_the_others(world: World) -> None:
    # Arrange: a cache of 1,024 live nonces; alice opens handshakes as fast as she can
    verifier = world.verifier(replay_cache_size=1024)
    accepted = 0

    # Act
    with pytest.raises(ReplayCacheFullError, match="'alice'.*already made 256 handshakes"):
        for _ in range(1024):
            verifier.accept(world.hello("alice").hello)
            accepted += 1

    # Assert: alice is held at her share, bob still gets in; alice again once the window moves on
    assert accepted == 256 and verifier.replay_guard.live_for("alice") == 256
    verifier.accept(world.hello("bob").hello)
    world.clock.now += 61
    verifier.accept(world.hello("alice").hello)


def test_unauthenticated_hellos_leave_nothing_in_the_replay_cache(world: World) -> None:
    # Arrange: 2,000 hellos from strangers: unknown ids, a wrong key, a forged signature
    verifier = world.verifier(replay_cache_size=16)
    genuine = world.hello("alice").hello
    attempts = [world.hello("mallory", identity=generate_identity()).hello for _ in range(1000)]
    attempts += [dataclasses.replace(genuine, signature=flip_bit(genuine.signature, i % 64)) for i in range(1000)]

    # Act
    refused = 0
    for hello in attempts:
        try:
            verifier.accept(hello)
        except (UnknownClientError, BadSignatureError):
            refused += 1

    # Assert: the bound for strangers is zero entries; the genuine client is unaffected
    assert refused == 2000 and len(verifier.replay_guard) == 0
    verifier.accept(genuine)


SECTIONS = {"model": {"name": "tiny-llama"}, "train": {"lr": 1e-4}, "lora": [{"r": 8}], "tokenizer": "bytes"}


def test_config_mismatch_names_the_sections_that_differ(world: World) -> None:
    # Arrange: the client runs another learning rate
    theirs = {**SECTIONS, "train": {"lr": 3e-4}}
    client_hash = hash_run_config(theirs)
    hello = world.hello(config_hash=client_hash, config_sections=hash_config_sections(theirs)).hello
    verifier = world.verifier(config_hash=hash_run_config(SECTIONS), config_sections=hash_config_sections(SECTIONS))

    # Act
    with pytest.raises(ConfigMismatchError) as info:
        verifier.accept(hello)

    # Assert
    message = str(info.value)
    assert "sections that differ: train " in message
    assert "model" not in message.split("sections that differ")[1]


def test_config_sections_are_signed_and_bounded(world: World) -> None:
    hello = world.hello(config_sections=hash_config_sections(SECTIONS)).hello
    altered = dataclasses.replace(hello, config_sections={**hello.config_sections, "train": bytes(32)})
    with pytest.raises(BadSignatureError):
        world.verifier().accept(altered)
    too_many = {f"s{i}": bytes(32) for i in range(MAX_CONFIG_SECTIONS + 1)}
    with pytest.raises(MalformedHandshakeError, match="at most"):
        world.hello(config_sections=too_many)
    with pytest.raises(MalformedHandshakeError, match="config_sections"):
        world.hello(config_sections={"train": b"short"})
