"""System tests of the gRPC transport over real sockets on 127.0.0.1."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import grpc
import pytest
import torch
from google.protobuf.message import Message

from fedsplit.channel import Channel, RemoteError, ServerSession
from fedsplit.protocol import pb
from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.errors import InsecureTransportWarning
from fedsplit.security.identity import generate_identity
from fedsplit.transport.errors import HandshakeRefusedError, TransportError
from fedsplit.transport.grpc_client import GrpcTransport, connect_grpc
from fedsplit.transport.grpc_common import METHOD
from fedsplit.transport.handshake import SessionFactory, connect, hello_frame

from .conftest import RUN_ID, Disconnects, Keys, StartServer, TcpTap, forward, open_error, toy_handler

MiB = 1024 * 1024
Dial = Callable[..., Channel]
pytestmark = pytest.mark.filterwarnings("ignore::fedsplit.security.errors.InsecureTransportWarning")


class Recorder:
    """Transport wrapper that keeps every request frame it forwards."""

    def __init__(self, inner: GrpcTransport) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    def exchange(self, frame: bytes) -> bytes:
        self.sent.append(frame)
        return self.inner.exchange(frame)

    def close(self) -> None:
        self.inner.close()


class FlipOneBit(Recorder):
    """Flips one bit of the sealed body of request number ``at``, as an attacker on the path would."""

    def __init__(self, inner: GrpcTransport, at: int) -> None:
        super().__init__(inner)
        self.at = at

    def exchange(self, frame: bytes) -> bytes:
        if len(self.sent) != self.at:
            return super().exchange(frame)
        message = pb.Frame.FromString(frame)
        body = bytearray(message.body)
        body[len(body) // 2] ^= 0x01
        message.body = bytes(body)
        return super().exchange(message.SerializeToString())


# -- handshake and modes ----------------------------------------------------------------------------


def test_tls_session_round_trip(start_server: StartServer, dial: Dial) -> None:
    server = start_server()
    channel = dial(server, "alice")
    hidden = torch.randn(2, 5, 8)

    assert torch.equal(forward(channel, hidden), hidden * 2)
    assert channel.call(pb.JOIN_ROUND, pb.JoinRound(), round=4).settings["client"] == "alice"


def test_mutual_tls_binds_the_certificate_to_the_client_id(keys: Keys, start_server: StartServer, dial: Dial) -> None:
    server = start_server(tls=keys.server_tls(mutual=True))
    alice = dial(server, "alice", tls=keys.channel_tls("alice"))
    hidden = torch.randn(1, 2, 3)

    assert torch.equal(forward(alice, hidden), hidden * 2)
    with pytest.raises(HandshakeRefusedError, match="certificate names") as info:
        dial(server, "bob", tls=keys.channel_tls("alice"))  # bob's identity over alice's certificate
    assert info.value.code == pb.PERMISSION_DENIED


def test_mutual_tls_refuses_a_client_without_certificate(keys: Keys, start_server: StartServer, dial: Dial) -> None:
    server = start_server(tls=keys.server_tls(mutual=True))

    with pytest.raises(TransportError, match="could not connect"):
        dial(server, "alice", connect_timeout_s=0.5)


def test_client_pins_its_ca(tmp_path_factory: pytest.TempPathFactory, start_server: StartServer, dial: Dial) -> None:
    other = Keys(tmp_path_factory.mktemp("other-ca"), generate_identity())
    run_keygen(other.directory, "x", with_ca=True)
    server = start_server()

    with pytest.raises(TransportError, match=r"could not connect to 127\.0\.0\.1"):
        dial(server, "alice", tls=other.channel_tls(), connect_timeout_s=0.5)


def test_insecure_mode_warns_and_still_seals(start_server: StartServer, dial: Dial) -> None:
    with pytest.warns(InsecureTransportWarning):
        server = start_server(insecure=True)
    with pytest.warns(InsecureTransportWarning):
        channel = dial(server, "alice", insecure=True)
    hidden = torch.randn(3, 4)

    assert torch.equal(forward(channel, hidden), hidden * 2)
    assert type(channel.sealer).__name__ == "SecureSession"


@pytest.mark.parametrize(
    ("who", "overrides", "code", "words"),
    [
        ("alice", {"identity": "fresh"}, pb.PERMISSION_DENIED, "not admitted"),
        ("alice", {"client_id": "mallory", "identity": "fresh"}, pb.PERMISSION_DENIED, "not admitted"),
        ("alice", {"protocol_version": 99}, pb.FAILED_PRECONDITION, "protocol version 99"),
        ("alice", {"config_hash": b"\x01" * 32}, pb.FAILED_PRECONDITION, "configuration mismatch"),
        ("alice", {"run_id": "run-2"}, pb.FAILED_PRECONDITION, "run-2"),
    ],
)
def test_bad_hellos_are_refused_while_a_good_client_keeps_working(
    keys: Keys, start_server: StartServer, dial: Dial, who: str, overrides: dict[str, object], code: int, words: str
) -> None:
    server = start_server()
    good = dial(server, "bob")
    if overrides.get("identity") == "fresh":
        overrides["identity"] = generate_identity()

    with pytest.raises(HandshakeRefusedError, match=words) as info:
        dial(server, who, credentials=keys.credentials(who, **overrides))

    assert info.value.code == code
    hidden = torch.randn(2, 2)
    assert torch.equal(forward(good, hidden), hidden * 2)


def test_wrong_frame_version_and_non_hello_first_frame_are_refused(start_server: StartServer) -> None:
    server = start_server(insecure=True)
    for frame, words in [
        (pb.Frame(protocol_version=7, kind=pb.CLIENT_HELLO).SerializeToString(), "version 7"),
        (hello_frame(pb.FORWARD, b""), "starts with an unchunked CLIENT_HELLO"),
    ]:
        with GrpcTransport(f"127.0.0.1:{server.port}", insecure=True) as transport:
            reply = pb.Frame.FromString(transport.exchange(frame))
        error = pb.Error.FromString(reply.body)
        assert (reply.kind, error.code) == (pb.ERROR, pb.FAILED_PRECONDITION)
        assert words in error.message


# -- chunking over the wire -------------------------------------------------------------------------


def test_ten_megabyte_hidden_state_goes_through_in_chunks(start_server: StartServer, dial: Dial) -> None:
    server = start_server(max_message_bytes=MiB)
    channel = dial(server, "alice", max_message_bytes=MiB)
    hidden = torch.randn(10, 256, 1024)  # 10 MiB of float32

    result = forward(channel, hidden)

    assert torch.equal(result, hidden * 2)
    stats = channel.transport.stats  # type: ignore[attr-defined]
    assert stats.messages_sent >= 11 and stats.messages_received >= 11
    assert stats.bytes_sent > hidden.numel() * 4


def test_oversized_unchunked_message_is_refused_by_grpc(start_server: StartServer, dial: Dial) -> None:
    server = start_server(max_message_bytes=MiB)
    careless = dial(server, "alice", max_message_bytes=4 * MiB)  # does not chunk a 2 MiB frame
    careful = dial(server, "bob", max_message_bytes=MiB)

    with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED"):
        forward(careless, torch.randn(512, 1024))

    hidden = torch.randn(512, 1024)
    assert torch.equal(forward(careful, hidden), hidden * 2)


def test_broken_chunk_stream_ends_that_session_only(start_server: StartServer, dial: Dial) -> None:
    server = start_server()
    alice, bob = dial(server, "alice"), dial(server, "bob")
    stray = pb.Frame(protocol_version=1, kind=pb.FORWARD, body=b"x", chunk_index=1, chunk_count=3)

    with pytest.raises(TransportError, match="INVALID_ARGUMENT.*starts at chunk 1"):
        alice.transport.exchange(stray.SerializeToString())

    with pytest.raises(TransportError, match="closed"):
        forward(alice, torch.ones(1))
    assert torch.equal(forward(bob, torch.ones(1)), torch.full((1,), 2.0))


# -- sealed frames under attack ---------------------------------------------------------------------


def test_tampered_frame_is_unauthenticated_and_the_session_goes_on(start_server: StartServer, dial: Dial) -> None:
    server = start_server()
    channel = dial(server, "alice")
    channel.transport = FlipOneBit(channel.transport, at=1)  # type: ignore[arg-type]
    forward(channel, torch.randn(4, 4))  # the first frame confirms the session keys

    with pytest.raises(RemoteError, match="AuthenticationError") as info:
        forward(channel, torch.randn(4, 4))

    assert info.value.code == pb.UNAUTHENTICATED
    hidden = torch.randn(4, 4)
    assert torch.equal(forward(channel, hidden), hidden * 2)


def test_replayed_frame_is_unauthenticated_and_the_session_goes_on(start_server: StartServer, dial: Dial) -> None:
    server = start_server()
    channel = dial(server, "alice")
    recorder = Recorder(channel.transport)  # type: ignore[arg-type]
    channel.transport = recorder
    forward(channel, torch.randn(2, 2))

    error = open_error(channel, recorder.inner.exchange(recorder.sent[0]))

    assert error.code == pb.UNAUTHENTICATED and "ReplayError" in error.message
    hidden = torch.randn(2, 2)
    assert torch.equal(forward(channel, hidden), hidden * 2)


def test_frame_sealed_for_alice_is_refused_on_bobs_session(start_server: StartServer, dial: Dial) -> None:
    server = start_server()
    alice, bob = dial(server, "alice"), dial(server, "bob")
    alice.transport = recorder = Recorder(alice.transport)  # type: ignore[arg-type]
    for step in range(3):  # alice's last frame has seq 2, above anything bob's session has seen
        forward(alice, torch.randn(2, 2), step=step)
    forward(bob, torch.randn(2, 2))

    error = open_error(bob, bob.transport.exchange(recorder.sent[-1]))  # type: ignore[attr-defined]

    assert error.code == pb.UNAUTHENTICATED and "AuthenticationError" in error.message
    hidden = torch.randn(2, 2)
    assert torch.equal(forward(bob, hidden), hidden * 2)
    assert torch.equal(forward(alice, hidden), hidden * 2)


def test_session_whose_first_frame_fails_to_open_is_discarded(start_server: StartServer, dial: Dial) -> None:
    gone = Disconnects()
    server = start_server(on_disconnect=gone)
    channel = dial(server, "alice")
    channel.transport = FlipOneBit(channel.transport, at=0)  # type: ignore[arg-type]

    with pytest.raises(RemoteError) as info:
        forward(channel, torch.randn(4, 4))

    assert info.value.code == pb.UNAUTHENTICATED
    assert gone.wait_for("alice")
    with pytest.raises(TransportError, match="UNAUTHENTICATED: the first frame"):
        forward(channel, torch.randn(4, 4))


def test_replayed_hello_is_refused(keys: Keys, start_server: StartServer) -> None:
    server = start_server()
    address = f"127.0.0.1:{server.port}"
    recorder = Recorder(GrpcTransport(address, tls=keys.channel_tls()))
    connect(recorder, keys.credentials("alice")).close()

    with GrpcTransport(address, tls=keys.channel_tls()) as replayer:
        reply = pb.Frame.FromString(replayer.exchange(recorder.sent[0]))

    error = pb.Error.FromString(reply.body)
    assert (reply.kind, error.code) == (pb.ERROR, pb.UNAUTHENTICATED)
    assert "replayed" in error.message


def test_dropped_client_loses_its_streams_only(start_server: StartServer, dial: Dial) -> None:
    gone = Disconnects()
    server = start_server(on_disconnect=gone)
    alice, bob = dial(server, "alice"), dial(server, "bob")

    assert server.drop("alice", "revoked by the operator") == 1

    assert gone.wait_for("alice")
    with pytest.raises(TransportError, match="PERMISSION_DENIED.*revoked by the operator"):
        forward(alice, torch.ones(1))
    assert torch.equal(forward(bob, torch.ones(1)), torch.full((1,), 2.0))
    assert server.drop("alice", "again") == 0


def test_wire_capture_holds_no_plaintext_hidden_state(
    keys: Keys, start_server: StartServer, tap_to: Callable[[int], TcpTap]
) -> None:
    hidden = torch.randn(4, 128, 64)
    raw = hidden.numpy().tobytes()
    slices = [raw[i : i + 48] for i in range(0, len(raw) - 48, len(raw) // 16)]
    doubled = (hidden * 2).numpy().tobytes()

    def capture(server_kwargs: dict[str, object], secure_session: bool, client_kwargs: dict[str, object]) -> bytes:
        server = start_server(**server_kwargs)
        tap = tap_to(server.port)
        address = f"127.0.0.1:{tap.port}"
        if secure_session:
            channel = connect_grpc(address, keys.credentials("alice"), connect_timeout_s=5.0, **client_kwargs)  # type: ignore[arg-type]
        else:  # control: the same stream with a PlainSealer session must expose the tensor
            transport = GrpcTransport(address, connect_timeout_s=5.0, **client_kwargs)  # type: ignore[arg-type]
            transport.exchange(hello_frame(pb.CLIENT_HELLO, pb.ClientHello(client_id="alice").SerializeToString()))
            channel = Channel(transport)
        assert torch.equal(forward(channel, hidden), hidden * 2)
        channel.close()
        return tap.bytes()

    plain = capture({"insecure": True, "session_factory": PlainFactory()}, False, {"insecure": True})
    sealed = capture({"insecure": True}, True, {"insecure": True})
    tls = capture({}, True, {"tls": keys.channel_tls()})

    assert sum(s in plain for s in slices) >= len(slices) // 2  # the tap does see plaintext when there is some
    for wire in (sealed, tls):
        assert len(wire) > len(raw)
        assert raw not in wire and doubled not in wire
        assert not any(s in wire for s in slices)
        assert not any(doubled[i : i + 48] in wire for i in range(0, len(doubled) - 48, len(doubled) // 16))


class PlainFactory:
    """Accepts any hello with an unsealed session: the positive control of the wire capture."""

    def accept(self, message: pb.ClientHello) -> tuple[pb.ServerHello, ServerSession]:
        return pb.ServerHello(), ServerSession(message.client_id, functools.partial(toy_handler, message.client_id))


# -- lifetimes and deadlines ------------------------------------------------------------------------


def test_on_disconnect_when_a_client_goes_away(start_server: StartServer, dial: Dial) -> None:
    gone = Disconnects()
    server = start_server(on_disconnect=gone)
    alice, bob = dial(server, "alice"), dial(server, "bob")
    forward(alice, torch.ones(1))
    assert server.active_clients == {"alice": 1, "bob": 1}

    alice.close()

    assert gone.wait_for("alice")
    assert gone.seen == ["alice"] and server.active_clients == {"bob": 1}
    assert torch.equal(forward(bob, torch.ones(1)), torch.full((1,), 2.0))


def test_on_disconnect_when_the_client_is_idle_too_long(start_server: StartServer, dial: Dial) -> None:
    gone = Disconnects()
    server = start_server(on_disconnect=gone, idle_timeout_s=0.3)
    channel = dial(server, "alice")

    assert gone.wait_for("alice", timeout_s=3.0)
    with pytest.raises(TransportError, match="DEADLINE_EXCEEDED"):
        forward(channel, torch.ones(1))


def test_on_disconnect_when_the_server_stops(start_server: StartServer, dial: Dial) -> None:
    gone = Disconnects()
    server = start_server(on_disconnect=gone)
    dial(server, "alice")

    server.stop(0)

    assert gone.wait_for("alice")


def test_server_ends_a_stream_that_never_says_hello(start_server: StartServer) -> None:
    server = start_server(insecure=True, handshake_timeout_s=0.3)
    release = threading.Event()

    def silent() -> object:
        release.wait(5.0)
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as grpc_channel:
        call = grpc_channel.stream_stream(METHOD)(silent())
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_wait_has_a_deadline_naming_the_address(keys: Keys, start_server: StartServer, dial: Dial) -> None:
    def slow(client_id: str, kind: int, round: int, step: int, request: Message) -> Message:  # noqa: A002
        time.sleep(1.5)
        return toy_handler(client_id, kind, round, step, request)

    factory = SessionFactory(keys.verifier(), lambda cid: functools.partial(slow, cid), RUN_ID)
    server = start_server(session_factory=factory)
    channel = dial(server, "alice", deadline_s=0.2)
    started = time.monotonic()

    with pytest.raises(TransportError, match=rf"no reply from 127\.0\.0\.1:{server.port} within 0\.2s"):
        forward(channel, torch.ones(1))

    assert time.monotonic() - started < 1.2  # well before the handler's answer
    with pytest.raises(TransportError, match="is closed"):
        forward(channel, torch.ones(1))


def test_streams_beyond_the_limit_are_refused(start_server: StartServer, dial: Dial) -> None:
    server = start_server(max_streams=1)
    dial(server, "alice")

    # Authenticated sessions are capped by the server (streams awaiting a hello have their own cap).
    with pytest.raises(HandshakeRefusedError, match="RESOURCE_EXHAUSTED: the server holds 1 sessions"):
        dial(server, "bob")


def test_unreachable_server_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match=r"could not connect to 127\.0\.0\.1:1 within 0\.3s"):
        GrpcTransport("127.0.0.1:1", insecure=True, connect_timeout_s=0.3)
