"""The private-aggregation messages on the wire: `fedsplit.aggregation` dataclasses <-> protobuf (``Agg*``).

Both ends of a networked private round (`fedsplit.server.private_round`, `fedsplit.client.private_update`)
convert through here, so that what a client sends is bounded before it is parsed any further: key and
signature sizes, the number of entries (at most the round's participants), the byte size of every
share, ciphertext block and context (``WireBounds``). Ids are checked against the round by the server.
Nothing is unpickled; ciphertexts stay opaque bytes until TenSEAL loads them under the run's context.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsplit.aggregation.ckks import CkksParams, CkksUpload, SealedKey
from fedsplit.aggregation.keys import SignedKeys
from fedsplit.aggregation.secagg import EncryptedShare, MaskedInput, UnmaskResponse
from fedsplit.protocol import ProtocolError, pb

if TYPE_CHECKING:
    from fedsplit.config import AggregationConfig

__all__ = ["WireBounds", "keys_to_pb", "keys_from_pb", "shares_to_pb", "shares_from_pb", "masked_from_pb",
           "unmask_from_pb", "sealed_key_from_pb", "upload_from_pb", "check_ids", "partition", "round_weights"]

_SIGNATURE_LEN = 64  # Ed25519
_KEY_LEN = 32  # X25519 public keys, SHA-256 commitments
MAX_ID_LEN = 128


@dataclass(frozen=True)
class WireBounds:
    """Largest sizes a private-aggregation message may have in a round of ``participants`` clients."""

    participants: int
    max_share_bytes: int = 1024  # a sealed pair of Shamir shares over GF(2^521 - 1) is ~190 bytes
    max_unmask_share_bytes: int = 256  # one Shamir share (~70 bytes)
    max_context_bytes: int = 1 << 20  # a keyless TenSEAL context (parameters only)
    max_sealed_key_bytes: int = 32 << 20  # the sealed secret context (secret key ~ poly_degree x primes x 8 B)

    @staticmethod
    def block_bytes(params: CkksParams) -> int:
        """Upper bound of one serialized CKKS ciphertext: 2 polynomials x degree x primes x 8 bytes + headers."""
        return 2 * params.poly_degree * len(params.coeff_bits) * 8 + 4096


def _fail(what: str, message: str) -> ProtocolError:
    return ProtocolError(f"{what}: {message}")


def _check_id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID_LEN:
        raise _fail(what, f"expected a client id of 1..{MAX_ID_LEN} characters, got {len(value)}")
    return value


def check_ids(ids: Iterable[str], allowed: Iterable[str], what: str) -> tuple[str, ...]:
    """The ids, each once and each one of ``allowed`` (the round's participants)."""
    out = tuple(ids)
    allowed_set = set(allowed)
    if len(out) > len(allowed_set) or len(set(out)) != len(out):
        raise _fail(what, f"expected distinct ids of the round's {len(allowed_set)} participants, got {len(out)}")
    stray = sorted(set(out) - allowed_set)
    if stray:
        raise _fail(what, f"ids not in the round: {stray[:3]}")
    return out


def keys_to_pb(advert: SignedKeys) -> pb.AggSignedKeys:
    return pb.AggSignedKeys(client_id=advert.client_id, purpose=advert.purpose, round=advert.round,
                            keys=list(advert.keys), signature=advert.signature)


def keys_from_pb(message: pb.AggSignedKeys, what: str, *, count: int) -> SignedKeys:
    """A signed key list of exactly ``count`` 32-byte keys (the signature is verified by the protocol class)."""
    if len(message.keys) != count or any(len(key) != _KEY_LEN for key in message.keys):
        raise _fail(what, f"expected {count} keys of {_KEY_LEN} bytes, got {[len(k) for k in message.keys][:4]}")
    if len(message.signature) != _SIGNATURE_LEN:
        raise _fail(what, f"expected a {_SIGNATURE_LEN}-byte signature, got {len(message.signature)} bytes")
    return SignedKeys(client_id=_check_id(message.client_id, what), purpose=message.purpose[:16],
                      round=int(message.round), keys=tuple(bytes(k) for k in message.keys),
                      signature=bytes(message.signature))


def shares_to_pb(shares: Sequence[EncryptedShare]) -> list[pb.AggShare]:
    return [pb.AggShare(sender=m.sender, recipient=m.recipient, sealed=m.sealed) for m in shares]


def shares_from_pb(items: Sequence[pb.AggShare], bounds: WireBounds, what: str) -> list[EncryptedShare]:
    if len(items) > bounds.participants:
        raise _fail(what, f"expected at most {bounds.participants} shares, got {len(items)}")
    out = []
    for item in items:
        if len(item.sealed) > bounds.max_share_bytes:
            raise _fail(what, f"a sealed share of {len(item.sealed)} bytes, expected <= {bounds.max_share_bytes}")
        out.append(EncryptedShare(_check_id(item.sender, what), _check_id(item.recipient, what), bytes(item.sealed)))
    return out


def masked_from_pb(
    client_id: str, message: pb.AggMaskedInput, expected_bytes: int, participants: Sequence[str]
) -> MaskedInput:
    """A masked vector of at most ``expected_bytes`` (a shorter one is excluded by the server, named)."""
    what = f"AggMaskedInput from {client_id!r}"
    if len(message.data) > expected_bytes:
        raise _fail(what, f"{len(message.data)} bytes, expected {expected_bytes}")
    return MaskedInput(client_id, bytes(message.data), check_ids(message.masked_with, participants, what),
                       check_ids(message.rejected, participants, what))


def unmask_from_pb(
    client_id: str, message: pb.AggUnmaskResponse, bounds: WireBounds, participants: Sequence[str]
) -> UnmaskResponse:
    what = f"AggUnmaskResponse from {client_id!r}"
    shares: list[Mapping[str, bytes]] = [message.self_shares, message.key_shares]
    for table in shares:
        check_ids(table.keys(), participants, what)
        if any(len(v) > bounds.max_unmask_share_bytes for v in table.values()):
            raise _fail(what, f"a share over {bounds.max_unmask_share_bytes} bytes")
    return UnmaskResponse(client_id, {k: bytes(v) for k, v in message.self_shares.items()},
                          {k: bytes(v) for k, v in message.key_shares.items()})


def sealed_key_from_pb(message: pb.AggSealedKey, bounds: WireBounds, what: str) -> SealedKey:
    if len(message.sealed) > bounds.max_sealed_key_bytes:
        raise _fail(what, f"a sealed key of {len(message.sealed)} bytes, expected <= {bounds.max_sealed_key_bytes}")
    return SealedKey(_check_id(message.holder, what), _check_id(message.recipient, what), bytes(message.sealed))


def upload_from_pb(client_id: str, message: pb.AggCkksUpload, params: CkksParams, length: int) -> CkksUpload:
    """At most the blocks a vector of ``length`` values needs, each at most a ciphertext's size."""
    what = f"AggCkksUpload from {client_id!r}"
    most, size = params.num_blocks(length), WireBounds.block_bytes(params)
    if len(message.blocks) > most:
        raise _fail(what, f"{len(message.blocks)} ciphertext blocks, expected {most}")
    if any(len(block) > size for block in message.blocks):
        raise _fail(what, f"a ciphertext block over {size} bytes")
    if len(message.key_id) != _KEY_LEN or len(message.signature) != _SIGNATURE_LEN:
        raise _fail(what, f"expected a {_KEY_LEN}-byte key id and a {_SIGNATURE_LEN}-byte signature")
    return CkksUpload(client_id, int(message.round), bytes(message.key_id), tuple(bytes(b) for b in message.blocks),
                      bytes(message.signature))


def partition(
    cfg: AggregationConfig, names: Iterable[str], encrypted: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Tensor names per mode for a private round: ``{mode: all}``, or the hybrid policy's ``plain`` + encrypted.

    ``encrypted``: under ``hybrid_top_fraction``, the round's encrypted tensors (the server's ranked set).
    """
    ordered = sorted(names)
    if cfg.mode in ("secagg", "ckks"):
        return {cfg.mode: ordered}
    if cfg.mode != "hybrid":
        raise ValueError(f"aggregation.mode: expected secagg, ckks or hybrid, got {cfg.mode!r}")
    if cfg.hybrid_top_fraction > 0:
        if encrypted is None:
            raise ValueError("aggregation.hybrid_top_fraction: expected the round's encrypted tensor names")
        chosen = set(encrypted)
        if not chosen or chosen - set(ordered):
            raise ValueError(f"aggregation.hybrid_top_fraction: expected encrypted names among the tensors, got "
                             f"{sorted(chosen - set(ordered))[:3] or 'none'}")
        plain = [n for n in ordered if n not in chosen]
        return {**({"plain": plain} if plain else {}), cfg.hybrid_encrypted_mode: sorted(chosen)}
    groups = cfg.hybrid_policy(ordered).partition(ordered)
    if not groups.get(cfg.hybrid_encrypted_mode):
        raise ValueError(f"aggregation.hybrid_encrypt: the policy encrypts none of the tensors ({ordered[:3]}...)")
    if set(groups) - {"plain", cfg.hybrid_encrypted_mode}:
        raise ValueError(f"aggregation.hybrid_encrypt: expected one encrypted mode, got {sorted(groups)}")
    return groups


def round_weights(reports: Mapping[str, int], max_weight: int, *, uniform: bool) -> dict[str, int]:
    """Integer weights the clients encode: their data reports (scaled down together above ``max_weight``), or 1."""
    if uniform:
        return dict.fromkeys(reports, 1)
    largest = max(reports.values(), default=1)
    if largest <= max_weight:
        return {cid: max(1, int(n)) for cid, n in reports.items()}
    return {cid: max(1, round(n * max_weight / largest)) for cid, n in reports.items()}
