"""TLS material loaders, and a real gRPC round trip over a socket with (mutual) TLS."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.errors import (
    CertificateError,
    InsecureKeyFileError,
    InsecureTransportWarning,
)
from fedsplit.security.identity import write_public_file, write_secret_file
from fedsplit.security.pki import (
    build_ca,
    cert_pem,
    issue_client_cert,
    run_issue_client_cert,
    tls_key_pem,
)
from fedsplit.security.tls import (
    ChannelTLS,
    ServerTLS,
    load_channel_tls,
    load_server_tls,
    warn_insecure_transport,
)

METHOD = "/fedsplit.test.Echo/Echo"


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    run_keygen(tmp_path, "server", with_ca=True)
    run_issue_client_cert(tmp_path, "alice")
    return tmp_path


def server_material(keydir: Path, client_ca: bool = True) -> ServerTLS:
    ca = keydir / "ca.crt" if client_ca else None
    return load_server_tls(keydir / "server-tls.key", keydir / "server-tls.crt", ca)


def alice_material(keydir: Path, ca: Path | None = None) -> ChannelTLS:
    key, cert = keydir / "alice-tls.key", keydir / "alice-tls.crt"
    return load_channel_tls(ca or keydir / "ca.crt", key, cert)


def test_server_material_without_client_ca_does_not_require_client_certs(keydir: Path) -> None:
    # Act
    material = server_material(keydir, client_ca=False)

    # Assert
    kwargs = material.grpc_kwargs()
    assert kwargs["require_client_auth"] is False
    assert kwargs["root_certificates"] is None
    [(key, chain)] = kwargs["private_key_certificate_chain_pairs"]  # type: ignore[misc]
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert chain.startswith(b"-----BEGIN CERTIFICATE-----")


def test_server_material_with_client_ca_requires_client_certs(keydir: Path) -> None:
    # Act
    material = server_material(keydir)

    # Assert
    assert material.require_client_auth is True
    assert material.root_certificates == (keydir / "ca.crt").read_bytes()


def test_key_that_does_not_match_the_certificate_is_rejected(keydir: Path) -> None:
    with pytest.raises(CertificateError, match="is not the private key of the certificate"):
        load_server_tls(keydir / "alice-tls.key", keydir / "server-tls.crt")


def test_world_readable_tls_key_is_refused(keydir: Path) -> None:
    # Arrange
    (keydir / "server-tls.key").chmod(0o644)

    # Act / Assert
    with pytest.raises(InsecureKeyFileError):
        load_server_tls(keydir / "server-tls.key", keydir / "server-tls.crt")


def test_a_leaf_certificate_is_refused_as_ca(keydir: Path) -> None:
    with pytest.raises(CertificateError, match="is not a CA"):
        load_channel_tls(keydir / "server-tls.crt")


def test_client_key_without_certificate_is_refused(keydir: Path) -> None:
    with pytest.raises(CertificateError, match="both"):
        load_channel_tls(keydir / "ca.crt", key_path=keydir / "alice-tls.key")


def test_material_repr_does_not_show_private_keys(keydir: Path) -> None:
    # Arrange
    material = alice_material(keydir)

    # Act
    text = repr(material)

    # Assert
    assert "PRIVATE KEY" not in text


def test_insecure_transport_warns_loudly() -> None:
    with pytest.warns(InsecureTransportWarning, match="WITHOUT TLS"):
        warn_insecure_transport("10.0.0.5:50051")


# --- real sockets ----------------------------------------------------------------------------

grpc = pytest.importorskip("grpc")


@pytest.fixture
def mtls_server(keydir: Path) -> Iterator[int]:
    """An echo server requiring client certificates signed by keydir's CA; yields its port."""
    material = server_material(keydir)
    handler = grpc.method_handlers_generic_handler(
        "fedsplit.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials(**material.grpc_kwargs())
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    yield port
    server.stop(grace=None)


def echo(target: str, material: ChannelTLS) -> bytes:
    credentials = grpc.ssl_channel_credentials(**material.grpc_kwargs())
    with grpc.secure_channel(target, credentials) as channel:
        return channel.unary_unary(METHOD)(b"ping", timeout=10)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_mutual_tls_round_trip_over_a_real_socket(
    keydir: Path, mtls_server: int, host: str
) -> None:
    # Arrange
    material = alice_material(keydir)

    # Act
    reply = echo(f"{host}:{mtls_server}", material)

    # Assert
    assert reply == b"ping"


def test_client_without_certificate_is_refused_by_mtls_server(
    keydir: Path, mtls_server: int
) -> None:
    # Arrange
    material = load_channel_tls(keydir / "ca.crt")

    # Act / Assert
    with pytest.raises(grpc.RpcError) as info:
        echo(f"localhost:{mtls_server}", material)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(
    keydir: Path, mtls_server: int, tmp_path: Path
) -> None:
    # Arrange
    rogue_ca_key, rogue_ca = build_ca("rogue CA")
    key, cert = issue_client_cert(rogue_ca_key, rogue_ca, "alice")
    rogue = tmp_path / "rogue"
    write_secret_file(rogue / "alice.key", tls_key_pem(key))
    write_public_file(rogue / "alice.crt", cert_pem(cert))
    material = load_channel_tls(keydir / "ca.crt", rogue / "alice.key", rogue / "alice.crt")

    # Act / Assert
    with pytest.raises(grpc.RpcError) as info:
        echo(f"localhost:{mtls_server}", material)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_whose_ca_it_does_not_trust(
    keydir: Path, mtls_server: int, tmp_path: Path
) -> None:
    # Arrange: the client trusts a different CA than the one that signed the server certificate
    _, other_ca = build_ca("other CA")
    write_public_file(tmp_path / "other" / "ca.crt", cert_pem(other_ca))
    material = alice_material(keydir, ca=tmp_path / "other" / "ca.crt")

    # Act / Assert
    with pytest.raises(grpc.RpcError) as info:
        echo(f"localhost:{mtls_server}", material)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
