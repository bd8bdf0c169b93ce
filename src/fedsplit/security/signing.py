"""Ed25519-signed control messages of server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3).

The root and its sub-servers (:mod:`fedsplit.server.hierarchy`) talk through a ``TCPStore`` that
anyone on the network can read and write. Every value they put there is sealed here::

    signature (64 bytes, Ed25519 over LABEL || role || JSON) || canonical JSON

The label binds the signature to this use, the role to the signer's side (``ROOT_ROLE`` or
``SUBSERVER_ROLE``): a sub-server's answer cannot be replayed as a root instruction. Binding to a
run, a root process and a sequence number is the control plane's job (it puts them in the body).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = ["CONTROL_LABEL", "ControlError", "ROOT_ROLE", "SUBSERVER_ROLE", "open_control", "seal_control"]

CONTROL_LABEL = b"fedsplit.hierarchy.control.v1\x00"
ROOT_ROLE, SUBSERVER_ROLE = b"root\x00", b"subserver\x00"
SIGNATURE_BYTES = 64


class ControlError(RuntimeError):
    """A control-plane message is missing, unsigned, replayed or malformed."""


def seal_control(key: ed25519.Ed25519PrivateKey, role: bytes, body: Mapping[str, Any]) -> bytes:
    """``signature (64 bytes) || canonical JSON``; the signature covers a label and the signer's role."""
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return key.sign(CONTROL_LABEL + role + data) + data


def open_control(key: ed25519.Ed25519PublicKey, role: bytes, blob: bytes, what: str) -> dict[str, Any]:
    """The JSON object ``blob`` carries, if ``key`` signed it in ``role``; ``what`` names it in errors."""
    signature, data = blob[:SIGNATURE_BYTES], blob[SIGNATURE_BYTES:]
    try:
        key.verify(signature, CONTROL_LABEL + role + data)
        body = json.loads(data)
    except InvalidSignature:
        raise ControlError(f"{what}: bad signature (not from the {role[:-1].decode()} key)") from None
    except ValueError as exc:
        raise ControlError(f"{what}: signed but not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ControlError(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body
