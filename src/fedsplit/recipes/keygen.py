"""``fedsplit keygen``: the key files a party needs (FL-GLM, arXiv 2406.14898; docs/security.md).

An Ed25519 identity (:mod:`fedsplit.security.identity`) and, for the server, a private TLS CA and a
server certificate (:mod:`fedsplit.security.pki`). Every file is created with ``O_EXCL``: nothing is
overwritten, and nothing is written unless every name is free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedsplit.security.errors import KeyFileError
from fedsplit.security.identity import (
    DEFAULT_TLS_HOSTS,
    generate_identity,
    refuse_existing,
    save_identity,
)
from fedsplit.security.wire import check_identifier


def run_keygen(
    out_dir: Path,
    name: str,
    with_ca: bool = False,
    hosts: Sequence[str] = DEFAULT_TLS_HOSTS,
) -> list[Path]:
    """Create an identity key pair, and with ``with_ca`` a TLS CA and a server certificate.

    Files (all refused if they already exist; nothing is written unless all names are free):
    ``NAME.key``/``NAME.pub`` (Ed25519 identity); with ``with_ca`` also ``ca.key``/``ca.crt``
    (self-signed ECDSA P-256 CA) and ``server-tls.key``/``server-tls.crt`` (server certificate
    signed by the CA, SANs = ``hosts``). Issue mutual-TLS client certificates later with
    `fedsplit.security.pki.run_issue_client_cert`. Returns the paths written.
    """
    from fedsplit.security import pki  # x509 builders only when a CA is asked for

    out_dir = Path(out_dir)
    check_identifier(name, "key name", KeyFileError)
    planned = [out_dir / f"{name}.key", out_dir / f"{name}.pub"]
    if with_ca:
        planned += pki.ca_paths(out_dir) + pki.server_tls_paths(out_dir)
    if len(set(planned)) != len(planned):
        raise KeyFileError(f"key name {name!r} collides with the CA/TLS file names in {out_dir}")
    refuse_existing(planned)
    if with_ca:  # a bad host name must fail before any file is written
        pki.check_hosts(hosts)
    written = list(save_identity(generate_identity(), out_dir, name))
    if with_ca:
        written += pki.write_ca_and_server_cert(out_dir, hosts)
    return written
