"""Connection slots: strangers and greedy clients cannot lock honest clients out (issue 7, item 3).

Before the fix ``max_streams`` was shared by everyone: ten TLS streams that never sent a hello
locked out 17 of 18 new sessions, and one admitted client holding 9 idle sessions locked out
every other client's reconnect.
"""

from __future__ import annotations

import threading
import time

import grpc
import torch

from fedsplit.transport.grpc_common import SERVICE

from .conftest import forward


def _silent_streams(server, keys, count):
    """``count`` TLS streams that open and never say a word; returns (channel, calls)."""
    creds = grpc.ssl_channel_credentials(root_certificates=(keys.directory / "ca.crt").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", creds)
    grpc.channel_ready_future(channel).result(timeout=5)
    method = channel.stream_stream(f"/{SERVICE}/Session")
    stop = threading.Event()

    def never():
        stop.wait()
        return
        yield  # a request iterator that blocks until the test ends

    calls = [method(never()) for _ in range(count)]
    time.sleep(0.3)  # let the server start handling them
    return channel, calls, stop


def test_silent_strangers_do_not_keep_an_honest_client_out(start_server, dial, keys):
    # Arrange: the old default for 3 clients was 2 * 3 + 4 = 10 slots, shared by everyone.
    server = start_server(max_streams=10, max_pending_handshakes=4, handshake_timeout_s=30.0)
    channel, calls, stop = _silent_streams(server, keys, 10)
    try:
        # Act: honest clients connect while the ten silent streams are open.
        served = 0
        for attempt in range(6):
            who = "alice" if attempt % 2 == 0 else "bob"
            ch = dial(server, who)
            served += int(torch.equal(forward(ch, torch.ones(1, 2, 3)), torch.full((1, 2, 3), 2.0)))
            ch.close()
    finally:
        stop.set()
        channel.close()

    # Assert
    assert served == 6


def test_one_client_hoarding_sessions_cannot_lock_out_another(start_server, dial, keys):
    server = start_server(max_streams=4, max_sessions_per_client=2)
    hoard = [dial(server, "alice") for _ in range(9)]  # each new one replaces alice's oldest beyond 2

    deadline = time.monotonic() + 5
    while server.active_clients.get("alice", 0) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    bob = dial(server, "bob")

    assert server.active_clients.get("alice") == 2
    assert torch.equal(forward(bob, torch.ones(1, 1, 1)), torch.full((1, 1, 1), 2.0))
    assert torch.equal(forward(hoard[-1], torch.ones(1, 1, 1)), torch.full((1, 1, 1), 2.0))  # the newest still works
