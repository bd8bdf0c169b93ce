"""Identity key files: modes, refusal of loose permissions, fingerprints, keygen without a CA."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedsplit.recipes.keygen import run_keygen
from fedsplit.security.errors import InsecureKeyFileError, KeyFileError
from fedsplit.security.identity import (
    fingerprint,
    generate_identity,
    load_private_key,
    load_public_key,
    public_key_raw,
    save_identity,
    short_fingerprint,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 000: files get exactly the mode passed to open(), so 0600 must come from the code."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_private_key_file_is_0600_even_with_permissive_umask(
    tmp_path: Path, permissive_umask: None
) -> None:
    # Arrange
    key = generate_identity()

    # Act
    key_path, pub_path = save_identity(key, tmp_path / "keys", "alice")

    # Assert
    assert mode_of(key_path) == 0o600
    assert mode_of(pub_path) == 0o644
    assert mode_of(tmp_path / "keys") == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_saved_identity_round_trips(tmp_path: Path) -> None:
    # Arrange
    key = generate_identity()
    key_path, pub_path = save_identity(key, tmp_path, "alice")

    # Act
    loaded_private = load_private_key(key_path)
    loaded_public = load_public_key(pub_path)

    # Assert
    assert public_key_raw(loaded_private.public_key()) == public_key_raw(key.public_key())
    assert public_key_raw(loaded_public) == public_key_raw(key.public_key())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_key_accessible_by_group_or_others(tmp_path: Path, mode: int) -> None:
    # Arrange
    key_path, _ = save_identity(generate_identity(), tmp_path, "alice")
    key_path.chmod(mode)

    # Act / Assert
    with pytest.raises(InsecureKeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_private_key(key_path)


def test_load_accepts_owner_only_read(tmp_path: Path) -> None:
    # Arrange
    key_path, _ = save_identity(generate_identity(), tmp_path, "alice")
    key_path.chmod(0o400)

    # Act
    key = load_private_key(key_path)

    # Assert
    assert len(public_key_raw(key.public_key())) == 32


def test_save_refuses_to_overwrite_and_leaves_existing_key_intact(tmp_path: Path) -> None:
    # Arrange
    key_path, _ = save_identity(generate_identity(), tmp_path, "alice")
    before = key_path.read_bytes()

    # Act / Assert
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        save_identity(generate_identity(), tmp_path, "alice")
    assert key_path.read_bytes() == before


def test_save_refuses_a_symlink_planted_at_the_key_path(tmp_path: Path) -> None:
    # Arrange
    target = tmp_path / "elsewhere"
    (tmp_path / "alice.key").symlink_to(target)

    # Act / Assert
    with pytest.raises(KeyFileError):
        save_identity(generate_identity(), tmp_path, "alice")
    assert not target.exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "with space"])
def test_key_names_cannot_escape_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match="key name"):
        save_identity(generate_identity(), tmp_path, name)


def test_load_private_key_rejects_a_public_key_file(tmp_path: Path) -> None:
    # Arrange
    _, pub_path = save_identity(generate_identity(), tmp_path, "alice")
    pub_path.chmod(0o600)

    # Act / Assert
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(pub_path)


def test_load_public_key_rejects_a_non_ed25519_key(tmp_path: Path) -> None:
    # Arrange
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "ec.pub"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    path.write_bytes(other.public_bytes(serialization.Encoding.PEM, spki))

    # Act / Assert
    with pytest.raises(KeyFileError, match="expected an Ed25519 public key"):
        load_public_key(path)


def test_missing_key_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="nope.key does not exist"):
        load_private_key(tmp_path / "nope.key")


def test_fingerprint_is_sha256_of_raw_public_key() -> None:
    # Arrange
    public = generate_identity().public_key()

    # Act
    full, short = fingerprint(public), short_fingerprint(public)

    # Assert
    assert full == hashlib.sha256(public_key_raw(public)).hexdigest()
    assert short == full[:16]
    assert fingerprint(generate_identity().public_key()) != full


def test_keygen_without_ca_writes_only_the_identity(tmp_path: Path) -> None:
    # Act
    written = run_keygen(tmp_path, "server")

    # Assert
    assert written == [tmp_path / "server.key", tmp_path / "server.pub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key", "server.pub"]
    assert mode_of(tmp_path / "server.key") == 0o600
