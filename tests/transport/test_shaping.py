"""Link shaping on real sockets: the schedule's arithmetic, then bytes through the proxy (lower time bounds
only: a loaded machine may be slower, never faster), and a TLS session to the server through it."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import torch

from fedsplit.transport.grpc_client import connect_grpc
from fedsplit.transport.shaping import LinkSchedule, LinkShape, ShapingProxy, shaped_address

from .conftest import Keys, StartServer, forward


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"latency_ms": -1}, "link.latency_ms"), ({"bandwidth_mbps": float("inf")}, "link.bandwidth_mbps"),
    ({"jitter_ms": "5"}, "link.jitter_ms"), ({"seed": 1.5}, "link.seed"),
])
def test_a_bad_shape_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinkShape(**kwargs)


def test_the_schedule_adds_latency_serializes_at_the_bandwidth_and_keeps_order():
    # Arrange: 8 Mbit/s moves 1 MB in 1 s; latency 50 ms
    schedule = LinkSchedule(LinkShape(latency_ms=50, bandwidth_mbps=8), random.Random(0))

    # Act: two 1 MB chunks read at t = 0, one 10-byte chunk read at t = 5 (the link is idle again)
    times = [schedule.deliver_at(0.0, 1_000_000), schedule.deliver_at(0.0, 1_000_000), schedule.deliver_at(5.0, 10)]

    # Assert
    assert times == pytest.approx([1.05, 2.05, 5.05 + 10e-6])  # 80 bits at 8 Mbit/s: 10 us


def test_jitter_is_seeded_bounded_and_never_reorders():
    shape = LinkShape(latency_ms=10, jitter_ms=30, seed=7)

    first = [LinkSchedule(shape, random.Random(1)).deliver_at(t / 1000, 100) for t in range(50)]
    again = [LinkSchedule(shape, random.Random(1)).deliver_at(t / 1000, 100) for t in range(50)]
    schedule = LinkSchedule(shape, random.Random(1))
    times = [schedule.deliver_at(t / 1000, 100) for t in range(50)]

    assert first == again
    assert times == sorted(times)
    assert all(t / 1000 + 0.010 <= d <= t / 1000 + 0.040 + 1e-9 for t, d in enumerate(times))
    assert len({round(d - t / 1000, 6) for t, d in enumerate(times)}) > 1  # the jitter varies


def test_an_inactive_shape_dials_the_server_directly():
    assert shaped_address("10.0.0.5:7443", LinkShape()) == ("10.0.0.5:7443", None, None)


class Echo:
    """A TCP server on 127.0.0.1 that sends back every byte it reads."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def round_trip(address: str, payload: bytes) -> tuple[bytes, float]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        start = time.monotonic()
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        received = bytearray()
        while len(received) < len(payload):
            received += sock.recv(1 << 16)
        return bytes(received), time.monotonic() - start


def test_the_proxy_delays_and_caps_every_byte_both_ways_and_keeps_them_intact():
    # Arrange: 400 kB at 16 Mbit/s is 0.2 s each way; 40 ms latency each way
    echo, payload = Echo(), os.urandom(400_000)
    shape = LinkShape(latency_ms=40, bandwidth_mbps=16, jitter_ms=5, seed=3)
    try:
        with ShapingProxy(f"127.0.0.1:{echo.port}", shape) as proxy:
            # Act
            small, small_s = round_trip(proxy.address, b"ping")
            big, big_s = round_trip(proxy.address, payload)
    finally:
        echo.close()

    # Assert: lower bounds only
    assert small == b"ping" and small_s >= 2 * 0.040
    assert big == payload and big_s >= 0.2 + 2 * 0.040  # the echo pipelines: one serialization shows


def test_a_tls_session_to_the_server_runs_through_the_proxy(keys: Keys, start_server: StartServer):
    # Arrange: the client dials the proxy; TLS checks the certificate against the server's host name
    server = start_server()
    address, server_name, proxy = shaped_address(f"127.0.0.1:{server.port}", LinkShape(latency_ms=30))
    assert proxy is not None and server_name == "127.0.0.1" and address != f"127.0.0.1:{server.port}"
    try:
        channel = connect_grpc(address, keys.credentials("alice"), tls=keys.channel_tls(), server_name=server_name,
                               connect_timeout_s=5.0)
        hidden = torch.ones(1, 2, 3)

        # Act
        start = time.monotonic()
        out = forward(channel, hidden)
        elapsed = time.monotonic() - start
        channel.close()
    finally:
        proxy.close()

    # Assert
    assert torch.equal(out, hidden * 2) and elapsed >= 2 * 0.030
