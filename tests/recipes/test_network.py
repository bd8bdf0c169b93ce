"""The network recipe's client side across machines: the server certificate's host names, refusals
that retrying cannot fix, and the one error line `simulate` reports (issue 7, item 9)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from google.protobuf.message import Message

from fedsplit.cli import main
from fedsplit.client.runner import Backoff, ClientRunner, RunAbortedError
from fedsplit.config import RunConfig, run_config_hash, run_config_sections
from fedsplit.protocol import ProtocolError, pb
from fedsplit.recipes import network
from fedsplit.recipes.keygen import run_keygen
from fedsplit.recipes.network import dial, last_error_line
from fedsplit.security.errors import ServerCertificateError
from fedsplit.security.handshake import HandshakeVerifier
from fedsplit.security.identity import load_private_key, load_public_key
from fedsplit.security.tls import load_channel_tls, load_server_tls
from fedsplit.transport.grpc_server import GrpcServer
from fedsplit.transport.handshake import ClientCredentials, SessionFactory

RUN_ID = "run-1"


def own_address() -> str:
    """This machine's primary non-loopback IPv4 address (a UDP connect sends no packet), or skip."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
    except OSError as exc:
        pytest.skip(f"no non-loopback network interface: {exc}")
    if address.startswith("127.") or address == "0.0.0.0":
        pytest.skip(f"no non-loopback network interface (got {address})")
    return address


def join_handler(client_id: str, kind: int, round: int, step: int, request: Message) -> Message:  # noqa: A002
    if kind == pb.JOIN_ROUND:
        return pb.RoundPlan(round=7, wait_s=0.01)
    raise ProtocolError(f"not served: {kind}", code=pb.FAILED_PRECONDITION)


@pytest.fixture(scope="module")
def tokenizer():
    from fedsplit.models import load_model

    return load_model("tiny-llama")[1]


def keys(directory: Path, *hosts: str) -> Path:
    args = ["keygen", "--out", str(directory), "--name", "server", "--ca"]
    assert main(args + [a for host in hosts for a in ("--host", host)]) == 0
    run_keygen(directory, "alice")
    return directory


def serve(directory: Path, host: str, cfg: RunConfig, tokenizer) -> GrpcServer:
    verifier = HandshakeVerifier(
        load_private_key(directory / "server.key"), {"alice": load_public_key(directory / "alice.pub")}, [],
        pb.PROTOCOL_VERSION_CURRENT, run_config_hash(cfg, tokenizer), run_id=RUN_ID,
        config_sections=run_config_sections(cfg, tokenizer),
    )
    factory = SessionFactory(verifier, lambda cid: lambda *a: join_handler(cid, *a), RUN_ID)
    tls = load_server_tls(directory / "server-tls.key", directory / "server-tls.crt")
    return GrpcServer(f"{host}:0", factory, tls=tls).start()


def credentials(directory: Path, cfg: RunConfig, tokenizer) -> ClientCredentials:
    return ClientCredentials(
        identity=load_private_key(directory / "alice.key"), server_key=load_public_key(directory / "server.pub"),
        client_id="alice", run_id=RUN_ID, config_hash=run_config_hash(cfg, tokenizer),
        config_sections=run_config_sections(cfg, tokenizer),
    )


def runner(connect) -> ClientRunner:
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}  # never trained on: the run ends at the handshake
    return ClientRunner("alice", None, None, [batch], RunConfig().train, connect,  # type: ignore[arg-type]
                        backoff=Backoff(base_s=0.01, max_s=0.02, max_attempts=3))


def test_a_certificate_issued_with_host_is_accepted_by_a_client_dialing_that_address(tmp_path, tokenizer):
    # Arrange: "two machines": the client dials this machine's own non-loopback address
    ip, cfg = own_address(), RunConfig()
    directory = keys(tmp_path / "keys", ip)
    server = serve(directory, ip, cfg, tokenizer)
    try:
        # Act
        channel = dial(f"{ip}:{server.port}", credentials(directory, cfg, tokenizer),
                       tls=load_channel_tls(directory / "ca.crt"), connect_timeout_s=5.0)
        plan = channel.call(pb.JOIN_ROUND, pb.JoinRound())
        channel.close()
    finally:
        server.stop(0)

    # Assert
    assert plan.round == 7


def test_without_host_the_client_fails_fast_saying_the_certificate_does_not_name_the_address(tmp_path, tokenizer):
    # Arrange: keygen's defaults (loopback names only), the server reached by its network address
    ip, cfg = own_address(), RunConfig()
    directory = keys(tmp_path / "keys")
    server = serve(directory, ip, cfg, tokenizer)
    tls = load_channel_tls(directory / "ca.crt")
    attempts = []

    def connect():
        attempts.append(time.monotonic())
        return dial(f"{ip}:{server.port}", credentials(directory, cfg, tokenizer), tls=tls, connect_timeout_s=2.0)

    try:
        # Act
        started = time.monotonic()
        with pytest.raises(RunAbortedError) as info:
            runner(connect).run()
        elapsed = time.monotonic() - started
    finally:
        server.stop(0)

    # Assert: the cause by name, one attempt only, no backoff loop
    message = str(info.value)
    assert f"the server's certificate does not name {ip}" in message and "Retrying cannot fix this" in message
    assert "127.0.0.1" in message and "--host" in message
    assert isinstance(info.value.__cause__, ServerCertificateError)
    assert len(attempts) == 1 and elapsed < 10


def test_a_config_mismatch_names_the_section_that_differs_and_is_not_retried(tmp_path, tokenizer):
    # Arrange: the client's learning rate differs from the server's
    cfg = RunConfig()
    theirs = replace(cfg, train=replace(cfg.train, lr=cfg.train.lr * 3))
    directory = keys(tmp_path / "keys")
    server = serve(directory, "127.0.0.1", cfg, tokenizer)
    tls = load_channel_tls(directory / "ca.crt")
    attempts = []

    def connect():
        attempts.append(1)
        creds = credentials(directory, theirs, tokenizer)
        return dial(f"127.0.0.1:{server.port}", creds, tls=tls, connect_timeout_s=5.0)

    try:
        # Act
        with pytest.raises(RunAbortedError) as info:
            runner(connect).run()
    finally:
        server.stop(0)

    # Assert
    message = str(info.value)
    assert "FAILED_PRECONDITION" in message and "sections that differ: train " in message
    assert "model" not in message.split("sections that differ")[1] and "Retrying cannot fix this" in message
    assert len(attempts) == 1
    ours, other = run_config_sections(cfg, tokenizer), run_config_sections(theirs, tokenizer)
    assert sorted(k for k in ours if ours[k] != other[k]) == ["train"]


def test_last_error_line_is_the_process_own_error():
    lines = [
        "2026-12-01 10:00:00,000 INFO fedsplit.recipes.network: serving",
        "2026-12-01 10:00:01,000 WARNING fedsplit.client.runner: client-1: reconnecting in 0.5 s",
        "fedsplit client: error: client client-1: the server refused the session (PERMISSION_DENIED): not admitted",
        "",
    ]
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "KeyError: 'lr'"]

    assert last_error_line_of(lines) == lines[2]
    assert last_error_line_of(traceback) == "KeyError: 'lr'"
    assert last_error_line_of(["just one line"]) == "just one line"


def last_error_line_of(lines: list[str]) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as handle:
        handle.write("\n".join(lines))
    return last_error_line(Path(handle.name))


def test_simulate_reports_the_failing_process_error_line(tmp_path, monkeypatch):
    # Arrange: processes that fail the way `fedsplit client` does, with one error line
    def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        role = args[0]
        code = 0 if role == "server" else 2
        line = "" if role == "server" else f"fedsplit client: error: {Path(args[2]).stem}: configuration mismatch"
        script = f"print('INFO starting'); print({line!r}); raise SystemExit({code})"
        with open(log_path, "w") as handle:
            return subprocess.Popen([sys.executable, "-c", script], stdout=handle, stderr=subprocess.STDOUT)

    monkeypatch.setattr(network, "_spawn", spawn)
    cfg = RunConfig()
    cfg = replace(cfg, data=replace(cfg.data, num_clients=1), federation=replace(cfg.federation, rounds=1))

    # Act
    with pytest.raises(RuntimeError) as info:
        network.simulate(cfg, tmp_path, timeout_s=60)

    # Assert
    assert "client-0 exited with 2: fedsplit client: error: client-0: configuration mismatch" in str(info.value)
