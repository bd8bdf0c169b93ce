"""TLS material for the gRPC transport, loaded and checked, returned as bytes.

FL-GLM (arXiv 2406.14898) needs an authenticated channel between each client and the server; the
AES-GCM layer (`fedsplit.security.aead`) protects payloads, and TLS underneath hides frame
metadata and authenticates the endpoint. This module does not import grpc: it returns exactly the
arguments of ``grpc.ssl_server_credentials`` and ``grpc.ssl_channel_credentials``::

    grpc.ssl_server_credentials(**load_server_tls(key, cert, client_ca).grpc_kwargs())
    grpc.ssl_channel_credentials(**load_channel_tls(ca, key, cert).grpc_kwargs())

Loading fails early, with the file name, on what would otherwise be an opaque handshake failure:
a private key readable by others, a key that does not belong to the certificate, an expired
certificate, or a "CA" that is not one. Running without TLS must be asked for explicitly
(``--insecure``) and is announced with `warn_insecure_transport`.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedsplit.security.errors import (
    CertificateError,
    InsecureTransportWarning,
    KeyFileError,
    ServerCertificateError,
)
from fedsplit.security.identity import read_secret_file

__all__ = [
    "ServerTLS",
    "ChannelTLS",
    "load_server_tls",
    "load_channel_tls",
    "warn_insecure_transport",
    "split_address",
    "certificate_names",
    "certificate_names_host",
    "check_server_certificate",
]


@dataclass(frozen=True)
class ServerTLS:
    """Arguments for ``grpc.ssl_server_credentials``. With a client CA, clients must present a
    certificate it signed (mutual TLS)."""

    private_key: bytes = field(repr=False)  # PEM
    certificate_chain: bytes  # PEM, leaf first
    root_certificates: bytes | None = None  # PEM CA for client certificates
    require_client_auth: bool = False

    def __post_init__(self) -> None:
        if self.require_client_auth and not self.root_certificates:
            raise CertificateError("require_client_auth needs root_certificates (the client CA)")

    def grpc_kwargs(self) -> dict[str, object]:
        return {
            "private_key_certificate_chain_pairs": [(self.private_key, self.certificate_chain)],
            "root_certificates": self.root_certificates,
            "require_client_auth": self.require_client_auth,
        }


@dataclass(frozen=True)
class ChannelTLS:
    """Arguments for ``grpc.ssl_channel_credentials``; key and chain only for mutual TLS."""

    root_certificates: bytes  # PEM CA that signed the server certificate
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise CertificateError("a client certificate needs both its private key and its chain")

    def grpc_kwargs(self) -> dict[str, object]:
        return {
            "root_certificates": self.root_certificates,
            "private_key": self.private_key,
            "certificate_chain": self.certificate_chain,
        }


def load_server_tls(
    key_path: Path, cert_path: Path, client_ca_path: Path | None = None
) -> ServerTLS:
    """Server key (0600) and certificate chain; with ``client_ca_path``, require client certs."""
    key_pem, chain_pem = _load_key_and_chain(Path(key_path), Path(cert_path))
    client_ca = None if client_ca_path is None else _load_ca(Path(client_ca_path))
    return ServerTLS(key_pem, chain_pem, client_ca, require_client_auth=client_ca is not None)


def load_channel_tls(
    ca_path: Path, key_path: Path | None = None, cert_path: Path | None = None
) -> ChannelTLS:
    """The CA that signed the server certificate, plus the client key and certificate for mTLS."""
    if (key_path is None) != (cert_path is None):
        raise CertificateError("pass both the client key and the client certificate, or neither")
    root = _load_ca(Path(ca_path))
    if key_path is None or cert_path is None:
        return ChannelTLS(root)
    key_pem, chain_pem = _load_key_and_chain(Path(key_path), Path(cert_path))
    return ChannelTLS(root, key_pem, chain_pem)


def warn_insecure_transport(address: str) -> None:
    """Announce a plaintext transport: what still holds and what does not."""
    warnings.warn(
        f"--insecure: the connection to {address} runs WITHOUT TLS. Payloads are still sealed "
        f"with the handshake's AES-GCM keys, but run id, client id, message kind, round, step, "
        f"sizes and the handshake itself are visible to anyone on the path. Use only on a "
        f"trusted loopback or test network.",
        InsecureTransportWarning,
        stacklevel=2,
    )


# --- why a TLS connection failed --------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN extension lists."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName) + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def certificate_names_host(cert: x509.Certificate, host: str) -> bool:
    """Whether ``host`` (a name or an address) is one of the certificate's SANs (``*.`` matches one label)."""
    address = _as_ip(host)
    if address is not None:
        return any(_as_ip(name) == address for name in certificate_names(cert))
    wanted = host.rstrip(".").lower()
    for name in certificate_names(cert):
        name = name.lower()
        if name == wanted or (name.startswith("*.") and wanted.partition(".")[2] == name[2:] and "." in wanted):
            return True
    return False


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def check_server_certificate(address: str, tls: ChannelTLS, timeout_s: float = 5.0) -> None:
    """Explain a failed TLS connection to ``address`` when the server's certificate is the cause.

    gRPC reports any TLS failure as a generic "could not connect". This opens one plain TLS
    connection (ALPN h2, as gRPC does), verifies the server's chain against the pinned CA without
    the host-name check, and compares the certificate's SANs with the host dialled. Raises
    `ServerCertificateError` if the certificate is not issued by the pinned CA or does not name
    the host; returns quietly when the certificate is fine or the server cannot be reached (the
    failure is then something else, and may be transient).
    """
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # checked below, with a message that names the host
    context.load_verify_locations(cadata=tls.root_certificates.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=None) as conn:
                der = conn.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise ServerCertificateError(
            f"the server at {address} presents a TLS certificate that the pinned CA does not verify "
            f"({exc.verify_message}); use the ca.crt of this server's `fedsplit keygen --ca`"
        ) from exc
    except (OSError, ValueError):
        return  # not reachable, or the handshake failed for another reason: nothing to say here
    if der is None:
        return
    cert = x509.load_der_x509_certificate(der)
    if not certificate_names_host(cert, host):
        names = ", ".join(certificate_names(cert)) or "no host"
        raise ServerCertificateError(
            f"the server's certificate does not name {host} (it names {names}); dial one of those, or "
            f"issue the server's keys with `fedsplit keygen --ca --host {host}` and give clients the new ca.crt"
        )


# --- internals -------------------------------------------------------------------------------


def _read_certs(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    try:
        pem = path.read_bytes()
        certs = x509.load_pem_x509_certificates(pem)
    except FileNotFoundError as exc:
        raise KeyFileError(f"certificate file {path} does not exist") from exc
    except ValueError as exc:
        raise CertificateError(f"{path} does not contain PEM certificates: {exc}") from exc
    return pem, certs


def _check_current(cert: x509.Certificate, path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(
            f"certificate {path} ({cert.subject.rfc4514_string()}) is valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
            f"not now; issue a new one"
        )


def _load_key_and_chain(key_path: Path, cert_path: Path) -> tuple[bytes, bytes]:
    key_pem = read_secret_file(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    chain_pem, chain = _read_certs(cert_path)
    if chain[0].public_key() != key.public_key():
        raise CertificateError(f"{key_path} is not the private key of the certificate {cert_path}")
    _check_current(chain[0], cert_path)
    return key_pem, chain_pem


def _load_ca(path: Path) -> bytes:
    pem, certs = _read_certs(path)
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CertificateError(f"{path}: {cert.subject.rfc4514_string()} is not a CA")
        _check_current(cert, path)
    return pem
