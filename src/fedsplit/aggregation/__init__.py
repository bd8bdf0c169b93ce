"""Private aggregation of the client parts (arXiv 2503.12226 on top of FL-GLM, arXiv 2406.14898).

Four ways to merge the clients' head/tail adapters, chosen by ``[aggregation] mode``:

* ``plain``  - FedAvg in the clear (`fedsplit.strategy`).
* ``secagg`` - secure aggregation with dropout recovery, SecAgg+ style (`secagg`): the server
  learns only the weighted sum.
* ``ckks``   - CKKS homomorphic encryption with TenSEAL (`ckks`): the server adds ciphertexts.
* ``hybrid`` - a per-tensor policy: sensitive tensors encrypted, the rest plain (`hybrid`).

and client-level differential privacy on top of any of them (`dp`: DP-FedAvg with an RDP
accountant). Every protocol is a set of transport-independent per-party state machines over plain
dataclasses and bytes; `rounds.run_round` plays all parties in one process (tests, benchmark).
Threat models: docs/aggregation.md.

Modules (import them directly; nothing is imported here, TenSEAL only when CKKS is used):
`codec` (tensor layout, fixed-point ring), `shamir`, `keys` (signed X25519, ChaCha20 masks,
AES-GCM), `secagg`, `ckks`, `hybrid`, `dp`, `rounds`, `errors`.
"""

from __future__ import annotations
