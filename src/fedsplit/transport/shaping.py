"""Link shaping on real sockets: added latency, a bandwidth cap and jitter between a client and the server.

Cross-cloud federation (arXiv 2503.12226) joins clouds behind links of very different speed. To make a
slow cloud reproducible in a simulation or a test, a client can run its traffic through a
:class:`ShapingProxy`: a small TCP relay on 127.0.0.1 that forwards every byte to the server, in both
directions, on a schedule (:class:`LinkSchedule`) that models one link per direction::

    client --TCP--> proxy ==[serialize at bandwidth_mbps, then latency_ms + U(0, jitter_ms)]==> server
    client <--TCP-- proxy <==[              the same model, its own schedule              ]== server

A chunk of ``n`` bytes read at time ``t`` leaves the link's queue at
``depart = max(t, link_free) + 8 n / (bandwidth_mbps 1e6)`` (the link carries one chunk at a time)
and is delivered at ``max(depart + latency + jitter, last delivery)``: bytes stay in order, as TCP
keeps them, so jitter never reorders. The jitter is drawn from ``random.Random`` seeded with
``(seed, connection number, direction)``: the same run gets the same schedule of draws. Everything
above the socket (gRPC, TLS, the handshake, sealed frames) is unchanged: the proxy only delays bytes.

The TLS certificate names the server's host, not the proxy's: the client dials the proxy's port with
the server's host name as the TLS target name (``GrpcTransport(server_name=...)``).
"""

from __future__ import annotations

import logging
import math
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # largest read from a socket; one scheduling unit


@dataclass
class LinkShape:
    """One client's link to the server, applied to each direction. All zero: no shaping."""

    latency_ms: float = field(default=0.0, metadata={"help": "added one-way delay per direction (ms)"})
    bandwidth_mbps: float = field(default=0.0, metadata={"help": "cap per direction in megabits/s (0 = none)"})
    jitter_ms: float = field(default=0.0, metadata={"help": "extra delay drawn from U(0, jitter_ms) per chunk"})
    seed: int = field(default=0, metadata={"help": "seed of the jitter draws"})

    def __post_init__(self) -> None:
        for name in ("latency_ms", "bandwidth_mbps", "jitter_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"link.{name}: expected a finite number >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"link.seed: expected an int, got {self.seed!r}")

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.bandwidth_mbps or self.jitter_ms)


class LinkSchedule:
    """When each chunk of one direction is delivered (seconds on the caller's clock); pure arithmetic."""

    def __init__(self, shape: LinkShape, rng: random.Random) -> None:
        self.shape, self.rng = shape, rng
        self._link_free = -math.inf  # when the link finishes serializing what it holds
        self._last_delivery = -math.inf

    def deliver_at(self, now: float, num_bytes: int) -> float:
        shape = self.shape
        serialize = 8.0 * num_bytes / (shape.bandwidth_mbps * 1e6) if shape.bandwidth_mbps else 0.0
        self._link_free = max(now, self._link_free) + serialize
        jitter = self.rng.uniform(0.0, shape.jitter_ms) if shape.jitter_ms else 0.0
        delivery = self._link_free + (shape.latency_ms + jitter) / 1e3
        self._last_delivery = max(delivery, self._last_delivery)  # TCP keeps order: no overtaking
        return self._last_delivery


class ShapingProxy:
    """A loopback TCP relay to ``target`` (``host:port``) that shapes both directions by ``shape``.

    ``start()`` listens on ``listen_host``, any free port (``address`` says which);
    ``close()`` stops accepting and closes every relayed connection. Use it as a context manager.
    """

    def __init__(self, target: str, shape: LinkShape, *, listen_host: str = "127.0.0.1") -> None:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"ShapingProxy: expected target host:port, got {target!r}")
        self.target = (host.strip("[]"), int(port))
        self.shape = shape
        self.listen_host = listen_host
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._closed = False

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("ShapingProxy.address: call start() first")
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> ShapingProxy:
        self._listener = socket.create_server((self.listen_host, 0))
        threading.Thread(target=self._accept, name=f"shaping-proxy {self.address}", daemon=True).start()
        log.info("link shaping: %s -> %s:%d (latency %.1f ms, bandwidth %s, jitter %.1f ms, seed %d)",
                 self.address, *self.target, self.shape.latency_ms,
                 f"{self.shape.bandwidth_mbps} Mbit/s" if self.shape.bandwidth_mbps else "unlimited",
                 self.shape.jitter_ms, self.shape.seed)
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10.0)
                upstream.settimeout(None)
            except OSError as exc:
                log.warning("link shaping: cannot reach %s:%d: %s", *self.target, exc)
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                number = self._connections
                self._connections += 1
                self._sockets += [client, upstream]
            for direction, (source, sink) in enumerate(((client, upstream), (upstream, client))):
                rng = random.Random(f"link:{self.shape.seed}:{number}:{direction}")
                _Pipe(source, sink, LinkSchedule(self.shape, rng)).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        if self._listener is not None:
            self._listener.close()
        for sock in sockets:
            _shut(sock)
            sock.close()

    def __enter__(self) -> ShapingProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shaped_address(address: str, shape: LinkShape) -> tuple[str, str | None, ShapingProxy | None]:
    """What a client dials for ``address`` under ``shape``: ``(address, TLS target name, proxy)``.

    An inactive shape changes nothing; otherwise a started proxy's address and the server's host
    name, which the server's TLS certificate names.
    """
    if not shape.active:
        return address, None, None
    proxy = ShapingProxy(address, shape).start()
    return proxy.address, proxy.target[0], proxy


class _Pipe:
    """One direction: a reader stamps each chunk with its delivery time, a writer sends it then."""

    def __init__(self, source: socket.socket, sink: socket.socket, schedule: LinkSchedule) -> None:
        self.source, self.sink, self.schedule = source, sink, schedule
        self.queue: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

    def start(self) -> None:
        threading.Thread(target=self._read, name="shaping-read", daemon=True).start()
        threading.Thread(target=self._write, name="shaping-write", daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.source.recv(CHUNK_BYTES):
                self.queue.put((self.schedule.deliver_at(time.monotonic(), len(data)), data))
        except OSError:
            pass
        self.queue.put(None)  # end of stream: the writer half-closes the sink after the last chunk

    def _write(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                due, data = item
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.sink.sendall(data)
        except OSError:
            _shut(self.source)  # the far end is gone: stop reading too
            return
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
