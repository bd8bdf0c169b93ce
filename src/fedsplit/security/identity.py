"""Long-term Ed25519 identities and the key files that hold them.

FL-GLM (arXiv 2406.14898) encrypts each client's traffic with keys only that client and the server
hold. Those keys are agreed per session (see `fedsplit.security.handshake`); what makes the
agreement *authenticated* is a long-term Ed25519 identity per party, whose public half the other
side knows in advance (the server's admitted list, the client's pinned server key).

Files: ``DIR/NAME.key`` is the private key, PEM PKCS#8, created with mode 0600 in a single
``open(O_CREAT | O_EXCL)`` so it is never readable by others, not even for an instant;
``DIR/NAME.pub`` is the public key, PEM SubjectPublicKeyInfo. Loading refuses a private key file
that group or others can read or write, the way OpenSSH does.

`run_keygen` is what ``fedsplit keygen --out DIR [--name NAME] [--ca]`` calls.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.security.errors import InsecureKeyFileError, KeyFileError
from fedsplit.security.wire import check_identifier

__all__ = [
    "generate_identity",
    "public_key_raw",
    "public_key_from_raw",
    "fingerprint",
    "short_fingerprint",
    "write_secret_file",
    "write_public_file",
    "read_secret_file",
    "refuse_existing",
    "save_identity",
    "load_private_key",
    "load_public_key",
    "run_keygen",
    "DEFAULT_TLS_HOSTS",
]

SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
KEY_DIR_MODE = 0o700
SHORT_FINGERPRINT_CHARS = 16
DEFAULT_TLS_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


# --- keys ------------------------------------------------------------------------------------


def generate_identity() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 identity key from the OS CSPRNG."""
    return ed25519.Ed25519PrivateKey.generate()


def public_key_raw(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (what the handshake carries)."""
    return public_key.public_bytes_raw()


def public_key_from_raw(raw: bytes) -> ed25519.Ed25519PublicKey:
    """Inverse of `public_key_raw`; raises `KeyFileError` unless ``raw`` is 32 bytes."""
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(f"not a raw Ed25519 public key ({len(raw)} bytes): {exc}") from exc


def fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """Lower-case hex SHA-256 of the raw public key (64 characters). Used in revocation lists."""
    return hashlib.sha256(public_key_raw(public_key)).hexdigest()


def short_fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """First 16 hex characters of `fingerprint` (64 bits): for log lines and error messages."""
    return fingerprint(public_key)[:SHORT_FINGERPRINT_CHARS]


# --- files -----------------------------------------------------------------------------------


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` atomically; refuse to replace an existing file or symlink."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite key material") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)  # the umask may have removed bits; this never adds any beyond mode
            handle.write(data)
            handle.flush()
            os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written key file left behind
        raise


def write_secret_file(path: Path, data: bytes) -> Path:
    """Write secret bytes to a new file that is mode 0600 from the moment it exists."""
    _ensure_dir(path.parent)
    _write_new(path, data, SECRET_FILE_MODE)
    return path


def write_public_file(path: Path, data: bytes) -> Path:
    """Write public bytes (public keys, certificates) to a new file, mode 0644."""
    _ensure_dir(path.parent)
    _write_new(path, data, PUBLIC_FILE_MODE)
    return path


def read_secret_file(path: Path) -> bytes:
    """Read a private key file, refusing one that group or others may read or write.

    The mode is checked on the opened descriptor (``fstat``), so the file cannot be swapped
    between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KeyFileError(f"private key file {path} does not exist") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        _check_secret_mode(path, info)
        return handle.read()


def _check_secret_mode(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"private key {path} is not a regular file")
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise InsecureKeyFileError(
            f"private key {path} has mode {stat.S_IMODE(info.st_mode):04o}: it is accessible by "
            f"group or others and must be treated as leaked unless you are sure it was not; "
            f"if so, run `chmod 600 {path}`"
        )


def save_identity(
    private_key: ed25519.Ed25519PrivateKey, out_dir: Path, name: str
) -> tuple[Path, Path]:
    """Write ``out_dir/name.key`` (PKCS#8 PEM, 0600) and ``out_dir/name.pub`` (SPKI PEM).

    Refuses to overwrite either file; checks both names before writing anything.
    """
    check_identifier(name, "key name", KeyFileError)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    refuse_existing([key_path, pub_path])
    write_secret_file(key_path, _private_pem(private_key))
    write_public_file(pub_path, _public_pem(private_key.public_key()))
    return key_path, pub_path


def _private_pem(private_key: ed25519.Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def refuse_existing(paths: Sequence[Path]) -> None:
    """Raise `KeyFileError` naming every path in ``paths`` that already exists."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise KeyFileError(
            f"refusing to overwrite existing key material: {', '.join(existing)}; "
            f"move it away or choose another --name/--out"
        )


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 identity from a 0600 PEM PKCS#8 file."""
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 identity key")
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM SubjectPublicKeyInfo file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"public key file {path} does not exist") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


# --- keygen ----------------------------------------------------------------------------------


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
