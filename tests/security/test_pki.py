"""Keygen with a CA: the CA verifies the server certificate (signature, SANs) and client certs."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.errors import CertificateError, KeyFileError
from fedsplit.security.pki import build_ca, client_uri, issue_server_cert, run_issue_client_cert


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    run_keygen(tmp_path, "server", with_ca=True, hosts=("127.0.0.1", "localhost", "::1"))
    return tmp_path


def test_keygen_with_ca_writes_identity_ca_and_server_cert(tmp_path: Path) -> None:
    # Act
    written = run_keygen(tmp_path, "server", with_ca=True)

    # Assert
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["server.key", "server.pub", "ca.key", "ca.crt", "server-tls.key", "server-tls.crt"]
    )
    for secret in ("server.key", "ca.key", "server-tls.key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600


def test_ca_signature_verifies_the_server_certificate(keydir: Path) -> None:
    # Arrange
    ca, server = load_cert(keydir / "ca.crt"), load_cert(keydir / "server-tls.crt")

    # Act
    server.verify_directly_issued_by(ca)  # raises InvalidSignature if not

    # Assert
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_carries_the_requested_sans(keydir: Path) -> None:
    # Arrange
    server = load_cert(keydir / "server-tls.crt")

    # Act
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # Assert
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
)
def test_server_certificate_passes_path_validation_for_its_hosts(
    keydir: Path, subject: x509.DNSName | x509.IPAddress
) -> None:
    # Arrange
    ca, server = load_cert(keydir / "ca.crt"), load_cert(keydir / "server-tls.crt")
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)

    # Act
    chain = verifier.verify(server, [])

    # Assert
    assert chain[-1] == ca


def test_server_certificate_fails_path_validation_for_another_host(keydir: Path) -> None:
    # Arrange
    ca, server = load_cert(keydir / "ca.crt"), load_cert(keydir / "server-tls.crt")
    policy = PolicyBuilder().store(Store([ca]))
    verifier = policy.build_server_verifier(x509.DNSName("evil.example"))

    # Act / Assert
    with pytest.raises(VerificationError):
        verifier.verify(server, [])


def test_server_certificate_from_another_ca_fails_validation(keydir: Path) -> None:
    # Arrange
    ca = load_cert(keydir / "ca.crt")
    rogue_key, rogue_ca = build_ca("rogue CA")
    _, rogue_server = issue_server_cert(rogue_key, rogue_ca, ["localhost"])
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))

    # Act / Assert
    with pytest.raises(VerificationError):
        verifier.verify(rogue_server, [])


def test_client_certificate_for_mutual_tls_is_issued_by_the_ca(keydir: Path) -> None:
    # Act
    written = run_issue_client_cert(keydir, "alice")

    # Assert
    assert [p.name for p in written] == ["alice-tls.key", "alice-tls.crt"]
    assert stat.S_IMODE(written[0].stat().st_mode) == 0o600
    ca, client = load_cert(keydir / "ca.crt"), load_cert(written[1])
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(client, [])
    assert x509.UniformResourceIdentifier(client_uri("alice")) in verified.subjects
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issuing_a_client_cert_twice_refuses_to_overwrite(keydir: Path) -> None:
    # Arrange
    run_issue_client_cert(keydir, "alice")

    # Act / Assert
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        run_issue_client_cert(keydir, "alice")


def test_keygen_refuses_before_writing_anything_if_a_ca_exists(keydir: Path) -> None:
    # Arrange: keydir already holds ca.key etc.
    before = sorted(p.name for p in keydir.iterdir())

    # Act / Assert
    with pytest.raises(KeyFileError, match="ca.key"):
        run_keygen(keydir, "other", with_ca=True)
    assert sorted(p.name for p in keydir.iterdir()) == before


def test_keygen_rejects_a_name_that_collides_with_ca_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="collides"):
        run_keygen(tmp_path, "ca", with_ca=True)


@pytest.mark.parametrize("host", ["bad host", "-leading.example", ""])
def test_invalid_host_names_are_rejected(host: str) -> None:
    # Arrange
    ca_key, ca = build_ca()

    # Act / Assert
    with pytest.raises(CertificateError, match="neither an IP address nor a valid DNS name"):
        issue_server_cert(ca_key, ca, [host])


def test_a_leaf_certificate_cannot_act_as_ca(keydir: Path) -> None:
    # Arrange
    ca_key, ca = build_ca()
    leaf_key, leaf = issue_server_cert(ca_key, ca, ["localhost"])

    # Act / Assert
    with pytest.raises(CertificateError, match="is not a CA"):
        issue_server_cert(leaf_key, leaf, ["localhost"])
