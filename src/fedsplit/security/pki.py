"""A minimal private CA for the TLS layer under the FL-GLM key-encryption channel.

FL-GLM (arXiv 2406.14898) assumes an authenticated channel between each client and the server.
The per-session AES-GCM keys (`fedsplit.security.handshake`) give confidentiality and integrity of
the payloads; TLS underneath hides the frame metadata (run id, round, step, kind) and
authenticates the transport endpoint. This module creates that PKI: one self-signed CA, one server
certificate with the server's host names and addresses as SANs, and optional client certificates
for mutual TLS.

TLS keys are ECDSA P-256 rather than Ed25519: every TLS stack gRPC may be built against (BoringSSL,
OpenSSL) accepts them. They are separate from the Ed25519 identity keys on purpose: losing a TLS key
does not let anyone complete the application handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsplit.security.errors import CertificateError, KeyFileError
from fedsplit.security.identity import (
    read_secret_file,
    refuse_existing,
    write_public_file,
    write_secret_file,
)
from fedsplit.security.wire import check_identifier

__all__ = [
    "CA_DAYS",
    "SERVER_DAYS",
    "CLIENT_DAYS",
    "ca_paths",
    "server_tls_paths",
    "client_tls_paths",
    "build_ca",
    "check_hosts",
    "issue_server_cert",
    "issue_client_cert",
    "client_uri",
    "tls_key_pem",
    "cert_pem",
    "write_ca_and_server_cert",
    "load_ca",
    "run_issue_client_cert",
]

CA_DAYS = 3650
SERVER_DAYS = 397  # the CA/Browser Forum maximum; short-lived is the point
CLIENT_DAYS = 397
BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock skew between hosts
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

TLSKey = ec.EllipticCurvePrivateKey


# --- file layout -----------------------------------------------------------------------------


def ca_paths(out_dir: Path) -> list[Path]:
    return [out_dir / "ca.key", out_dir / "ca.crt"]


def server_tls_paths(out_dir: Path) -> list[Path]:
    return [out_dir / "server-tls.key", out_dir / "server-tls.crt"]


def client_tls_paths(out_dir: Path, client_id: str) -> list[Path]:
    check_identifier(client_id, "client id", KeyFileError)
    return [out_dir / f"{client_id}-tls.key", out_dir / f"{client_id}-tls.crt"]


# --- certificate builders (pure: no files) ---------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> TLSKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsplit"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days <= 0:
        raise CertificateError(f"certificate validity must be a positive day count, got {days}")
    start = _now() - BACKDATE
    return builder.not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))


def build_ca(
    common_name: str = "fedsplit CA", days: int = CA_DAYS
) -> tuple[TLSKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder, days).sign(key, hashes.SHA256())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_leaf(
    ca_key: TLSKey,
    ca_cert: x509.Certificate,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[TLSKey, x509.Certificate]:
    _check_is_ca(ca_cert)
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    return key, _validity(builder, days).sign(ca_key, hashes.SHA256())


def _check_is_ca(ca_cert: x509.Certificate) -> None:
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{ca_cert.subject.rfc4514_string()} is not a CA certificate")


def _san_for_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CertificateError(f"{host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def check_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The SANs for ``hosts`` (DNS names and IP addresses); `CertificateError` on a bad or empty list."""
    if isinstance(hosts, str) or not hosts:
        raise CertificateError(f"server certificate needs a non-empty list of hosts, got {hosts!r}")
    return [_san_for_host(host) for host in hosts]


def issue_server_cert(
    ca_key: TLSKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int = SERVER_DAYS
) -> tuple[TLSKey, x509.Certificate]:
    """A TLS server certificate (EKU serverAuth) whose SANs are ``hosts`` (names or addresses)."""
    sans = check_hosts(hosts)
    return _issue_leaf(ca_key, ca_cert, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, days)


def client_uri(client_id: str) -> str:
    """The SAN URI that names a client in its mutual-TLS certificate."""
    return f"urn:fedsplit:client:{client_id}"


def issue_client_cert(
    ca_key: TLSKey, ca_cert: x509.Certificate, client_id: str, days: int = CLIENT_DAYS
) -> tuple[TLSKey, x509.Certificate]:
    """A mutual-TLS client certificate (EKU clientAuth), CN and SAN URI naming ``client_id``."""
    check_identifier(client_id, "client id", CertificateError)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(client_uri(client_id))]
    return _issue_leaf(ca_key, ca_cert, client_id, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days)


# --- PEM and files ---------------------------------------------------------------------------


def tls_key_pem(key: TLSKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(paths: list[Path], key: TLSKey, cert: x509.Certificate) -> list[Path]:
    refuse_existing(paths)
    key_path, cert_path = paths
    return [
        write_secret_file(key_path, tls_key_pem(key)),
        write_public_file(cert_path, cert_pem(cert)),
    ]


def write_ca_and_server_cert(out_dir: Path, hosts: Sequence[str]) -> list[Path]:
    """Create ``ca.key``/``ca.crt`` and ``server-tls.key``/``server-tls.crt`` in ``out_dir``."""
    ca_key, ca_cert = build_ca()
    server_key, server_cert = issue_server_cert(ca_key, ca_cert, hosts)
    return _write_pair(ca_paths(out_dir), ca_key, ca_cert) + _write_pair(
        server_tls_paths(out_dir), server_key, server_cert
    )


def load_ca(ca_dir: Path) -> tuple[TLSKey, x509.Certificate]:
    """Load ``ca.key`` (must be 0600) and ``ca.crt`` from ``ca_dir`` and check they match."""
    key_path, cert_path = ca_paths(Path(ca_dir))
    try:
        key = serialization.load_pem_private_key(read_secret_file(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path} holds a {type(key).__name__}, expected an ECDSA CA key")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (FileNotFoundError, ValueError) as exc:
        raise KeyFileError(f"cannot read CA certificate {cert_path}: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise CertificateError(f"{key_path} is not the key of the certificate {cert_path}")
    return key, cert


def run_issue_client_cert(ca_dir: Path, client_id: str, out_dir: Path | None = None) -> list[Path]:
    """Issue a mutual-TLS client certificate with the CA in ``ca_dir``.

    Writes ``CLIENT_ID-tls.key`` (0600) and ``CLIENT_ID-tls.crt`` to ``out_dir`` (default
    ``ca_dir``); hand both and ``ca.crt`` to the client over a trusted channel.
    """
    ca_key, ca_cert = load_ca(ca_dir)
    key, cert = issue_client_cert(ca_key, ca_cert, client_id)
    return _write_pair(client_tls_paths(Path(out_dir or ca_dir), client_id), key, cert)
