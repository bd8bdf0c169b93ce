"""CKKS aggregation: equals FedAvg within 1e-6 relative, any size, tamper-evident, server without secret key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

pytest.importorskip("tenseal", reason="CKKS needs the optional extra fedsplit[he] (tenseal)")

from fedsplit.aggregation.ckks import CkksKeyHolder, CkksParams, CkksServer, SealedKey  # noqa: E402
from fedsplit.aggregation.errors import MalformedMessageError  # noqa: E402
from fedsplit.aggregation.rounds import Faults, run_round, setup_ckks  # noqa: E402
from fedsplit.strategy import ClientUpdate, weighted_average  # noqa: E402


def _updates(n: int, numel: int, seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"client-{i}", {"head/a": torch.randn(numel // 2, generator=gen) * 0.05,
                                     "tail/layers.3.b": torch.randn(numel - numel // 2, generator=gen) * 0.05},
                     5 + 3 * i, {})
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def session():
    identities = {f"client-{i}": ed25519.Ed25519PrivateKey.generate() for i in range(4)}
    return identities, setup_ckks(sorted(identities), identities, CkksParams(), run_id="run")


def _relative_error(report_tensors: dict, updates: list[ClientUpdate], ids: list[str]) -> float:
    chosen = [u for u in updates if u.client_id in ids]
    exact = weighted_average([({k: t.double() for k, t in u.tensors.items()}, float(u.num_examples)) for u in chosen])
    scale = max(float(t.abs().max()) for t in exact.values())
    return max(float((report_tensors[k].double() - exact[k]).abs().max()) for k in exact) / scale


def test_equals_fedavg_within_1e6_relative_and_larger_than_one_ciphertext(session) -> None:
    identities, keys = session
    updates = [ClientUpdate(u.client_id, {k: t.double() for k, t in u.tensors.items()}, u.num_examples, {})
               for u in _updates(4, 3 * 4096 + 5)]  # 4 blocks: more values than one ciphertext holds
    report = run_round("ckks", updates, identities=identities, ckks=keys, run_id="run")
    assert report.clients == sorted(identities) and report.num_examples == sum(u.num_examples for u in updates)
    assert _relative_error(report.tensors, updates, report.clients) < 1e-6


def test_tampered_repeated_or_wrong_size_upload_is_excluded(session) -> None:
    identities, keys = session
    updates = _updates(4, 300)
    faults = Faults(tamper=frozenset({"client-1"}), duplicate=frozenset({"client-2"}),
                    wrong_size=frozenset({"client-3"}))
    report = run_round("ckks", updates, identities=identities, ckks=keys, run_id="run", faults=faults)
    assert "tampered" in report.excluded["client-1"] and "twice" in report.excluded["client-2"]
    assert "0 ciphertext blocks, expected 1" in report.excluded["client-3"]
    assert report.clients == ["client-0"]
    assert _relative_error(report.tensors, updates, report.clients) < 1e-6


def test_server_holds_no_secret_key_and_refuses_one(session) -> None:
    identities, keys = session
    peers = {c: k.public_key() for c, k in identities.items()}
    server = CkksServer(keys.public_context, keys.key_id, sorted(peers), peers, keys.params, 10, run_id="run", round=1)
    assert server.context.is_private() is False
    import tenseal as ts

    with pytest.raises(ValueError, match="encryption"):  # keyless: it cannot forge a ciphertext either
        ts.ckks_vector(server.context, [1.0])

    secret = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 60])
    with pytest.raises(ValueError, match="without the secret key"):
        CkksServer(secret.serialize(save_secret_key=True), keys.key_id, sorted(peers), peers, keys.params, 10,
                   run_id="run", round=1)


def test_the_sealed_key_only_opens_for_its_recipient() -> None:
    identities = {c: ed25519.Ed25519PrivateKey.generate() for c in ("a", "b", "c")}
    keys = setup_ckks(["a", "b", "c"], identities, CkksParams(), run_id="run")
    peers = {c: k.public_key() for c, k in identities.items()}
    holder = CkksKeyHolder("a", identities["a"], peers, CkksParams(), run_id="run", round=0)
    from fedsplit.aggregation.ckks import CkksClient

    b, c = (CkksClient(x, identities[x], peers, CkksParams(), run_id="run", round=0) for x in ("b", "c"))
    sealed, _ = holder.seal_for([b.advertise(), c.advertise()])
    for_b = next(m for m in sealed if m.recipient == "b")
    with pytest.raises(MalformedMessageError):  # c (or the relaying server) cannot open b's copy
        c.receive_key(holder.advertise(), SealedKey(for_b.holder, "c", for_b.sealed))
    b.receive_key(holder.advertise(), for_b)
    assert b.key_id == holder.key_id
    assert keys.key_id != holder.key_id  # a fresh key per set-up


def test_vector_length_mismatch_on_decrypt(session) -> None:
    identities, keys = session
    client = keys.clients["client-0"]
    upload = client.encrypt(np.ones(10), 1)
    peers = {c: k.public_key() for c, k in identities.items()}
    server = CkksServer(keys.public_context, keys.key_id, ["client-0"], peers, keys.params, 10, run_id="run", round=1)
    server.receive(upload)
    total = server.finish()
    with pytest.raises(MalformedMessageError, match="values"):
        client.decrypt(total, 11)


def test_upload_under_another_key_is_excluded(session) -> None:
    identities, keys = session
    other = setup_ckks(sorted(identities), identities, CkksParams(), run_id="run")  # a second, foreign key set
    peers = {c: k.public_key() for c, k in identities.items()}
    server = CkksServer(keys.public_context, keys.key_id, sorted(peers), peers, keys.params, 10, run_id="run", round=1)
    server.receive(other.clients["client-0"].encrypt(np.ones(10), 1))
    server.receive(keys.clients["client-1"].encrypt(np.ones(10), 1))
    assert "another CKKS key" in server.excluded["client-0"]
    assert server.finish().clients == ["client-1"]


def test_values_that_could_overflow_the_sum_are_refused(session) -> None:
    _, keys = session
    client = keys.clients["client-0"]
    with pytest.raises(ValueError, match="max_clients"):
        client.encrypt(np.array([0.0, keys.params.max_abs * 1.01]), 1)
    with pytest.raises(ValueError, match="max_clients"):
        client.encrypt(np.array([np.nan]), 1)
