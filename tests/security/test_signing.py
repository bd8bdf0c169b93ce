"""Ed25519-signed control messages (fedsplit.security.signing)."""

from __future__ import annotations

import pytest

from fedsplit.security.identity import generate_identity
from fedsplit.security.signing import ROOT_ROLE, SUBSERVER_ROLE, ControlError, open_control, seal_control


def test_a_sealed_body_opens_with_the_signers_key_and_role():
    key = generate_identity()

    blob = seal_control(key, ROOT_ROLE, {"seq": 1, "op": "sync"})

    assert open_control(key.public_key(), ROOT_ROLE, blob, "ctl/1") == {"seq": 1, "op": "sync"}


def test_the_signature_binds_the_role_and_the_bytes():
    # Arrange: a sub-server's answer, and the same answer with one byte of the JSON changed
    key = generate_identity()
    blob = seal_control(key, SUBSERVER_ROLE, {"ok": True})
    tampered = blob.replace(b"true", b"fals")

    # Act / Assert: it is not a root instruction, and a changed byte fails the signature
    with pytest.raises(ControlError, match="bad signature"):
        open_control(key.public_key(), ROOT_ROLE, blob, "res/1/1")
    with pytest.raises(ControlError, match="bad signature"):
        open_control(key.public_key(), SUBSERVER_ROLE, tampered, "res/1/1")


def test_a_signed_body_that_is_not_a_json_object_is_refused():
    key = generate_identity()

    blob = seal_control(key, ROOT_ROLE, [1, 2])  # type: ignore[arg-type]

    with pytest.raises(ControlError, match="expected a JSON object"):
        open_control(key.public_key(), ROOT_ROLE, blob, "hello")
