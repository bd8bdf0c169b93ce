"""The round loop's pure rules: when the lobby may start a round."""

from __future__ import annotations

from fedsplit.server.rounds import LobbyRule


def _rule(**overrides) -> LobbyRule:
    settings = dict(clients=3, least=2, grace_s=10.0, deadline=100.0)
    settings.update(overrides)
    return LobbyRule(**settings)


def test_every_client_present_starts_at_once() -> None:
    assert _rule().ready(0.0, {"a", "b", "c"})


def test_enough_clients_start_after_the_grace_period() -> None:
    rule = _rule()
    assert not rule.ready(0.0, {"a"})
    assert not rule.ready(5.0, {"a", "b"})  # enough since t = 5
    assert rule.wake_at({"a", "b"}) == 15.0
    assert not rule.ready(14.9, {"a", "b"})
    assert rule.ready(15.0, {"a", "b"})


def test_dropping_below_least_restarts_the_grace_clock() -> None:
    rule = _rule()
    rule.ready(0.0, {"a", "b"})
    rule.ready(5.0, {"a"})
    assert not rule.ready(12.0, {"a", "b"})  # enough again since t = 12, not t = 0
    assert rule.ready(22.0, {"a", "b"})


def test_resumed_clients_are_awaited_until_the_deadline() -> None:
    rule = _rule(resumed=frozenset({"c"}))
    assert not rule.ready(0.0, {"a", "b"})
    assert not rule.ready(50.0, {"a", "b"})  # the grace period passed, but c aggregated the last round
    assert rule.wake_at({"a", "b"}) == 100.0
    assert rule.ready(100.0, {"a", "b"})  # the deadline: start without it (the coordinator warns)


def test_too_few_clients_never_start() -> None:
    rule = _rule()
    assert not rule.ready(0.0, {"a"})
    assert not rule.ready(1000.0, {"a"})  # the coordinator raises NotEnoughClientsError at the deadline


def test_enough_clients_at_the_deadline_start_even_within_the_grace_period() -> None:
    rule = _rule(deadline=12.0)
    assert not rule.ready(5.0, {"a", "b"})
    assert rule.ready(12.0, {"a", "b"})  # not "too few clients": two of the two needed are there
