"""Server-hierarchical split training: K trunk replicas behind one root (FL-GLM, arXiv 2406.14898, Sec. 3.3).

FL-GLM's "server-hierarchical" mode serves the clients from several sub-servers, each with its own
copy of the trunk, and averages the sub-servers' trunks. Here:

    clients --gRPC--> root: RoundCoordinator -> ReplicaRouter --gRPC, one session per client--> sub-server k
                                                      |                              (TrunkServer replica)
                                                      '--- torch.distributed all_reduce ---' ranks 0 (root), 1..K

One module per concern:

* :mod:`.control` - the control plane: signed messages (FORM a group generation, SYNC, GATHER,
  STOP) and results in a ``TCPStore`` the root hosts (``RootControl`` / ``SubControl``). A separate
  channel, not the relay sessions, because a sub-server must join every collective even when it
  has no client session at all, and the wire protocol has no message kind for it. Messages are
  Ed25519-signed (:mod:`fedsplit.security.signing`; root identity / server identity) and bound to
  the run id, a fresh root nonce and a sequence number: a party on the network can read or delete
  them, not forge or replay them.
* :mod:`.collectives` - the trainable state (LoRA weights or trunk prefixes, and AdamW moments) as one vector, the
  averaging all-reduce and the gather over it, process-group generations, backend choice.
* :mod:`.router` - the root's trunk, :class:`~fedsplit.server.hierarchy.router.ReplicaRouter`:
  relay, rerouting after a failure, the gate that drains steps before a sync; with
  :mod:`.relay` (the root's sessions to the sub-servers) and :mod:`.assignment` (which sub-server
  serves which client).
* :mod:`.replica` - the sub-server side: one replica serving the root's relayed steps with a
  :class:`~fedsplit.server.trunk.TrunkServer` and following the control messages.

Starting the processes and wiring them (the spec file, ``start_hierarchy``, the ``fedsplit
subserver`` process) is a recipe: :mod:`fedsplit.recipes.hierarchy`, :mod:`fedsplit.recipes.subserver`.

Relay. The root keeps the client sessions and the round loop. Its trunk object is the router: it
gives every client a sub-server (balanced, deterministic by client id) and relays the client's
FORWARD / BACKWARD / OPTIMIZER_STEP over a session the root opens as ``root.<client id>``, signed
with the root's own identity key. Each message is opened on the root (the client's keys) and sealed
again (the sub-server's keys).

Averaging. Ranks 0 (the root, weight 0) and 1..K form a process group (``init_method=tcp://``, gloo
on CPU, nccl with one GPU per rank). The root syncs at explicit points only: when any sub-server
has taken ``sync_every`` optimizer steps since the last sync (the router's worker thread), at round
end (``ReplicaRouter.end_round``, which the coordinator calls before it aggregates and checkpoints)
and when asked (``ReplicaRouter.sync``). A sync closes the gate to new steps, lets the started ones
finish, and every rank all-reduces its trunk LoRA weights and AdamW moments:

    x <- sum_k (n_k / N) x_k        n_k = steps replica k took since the last sync, N = sum_k n_k

for the weights, ``exp_avg``, ``exp_avg_sq`` and AdamW's per-parameter ``step``, so a replica that
did nothing since the last sync weighs nothing, and ``step`` becomes the number of moment updates
the averaged moments carry (bias correction stays consistent). The LR-schedule position
(``steps_taken``) becomes the root's count of all client steps the trunk has served, the same on
every rank. After the sync every rank (the root too) holds the same bytes; the root checks it with
the replicas' digests. A ``PUSH`` sync (root weight 1, replicas 0) copies the root's state to the
replicas: at start, and whenever the root's state was changed from outside (checkpoint restore, a
failed round's roll-back).

Failures. A sub-server is dead when its process exits (local launches), a relay to it fails and a
fresh session cannot be opened, or it misses a collective. Its clients move to the survivors
(fewest clients first). A FORWARD is retried on the new sub-server (nothing was committed); a
BACKWARD / OPTIMIZER_STEP fails with ABORTED (the graph and the gradients died with it), so the
client loses the round and the coordinator readmits it next round. The group is formed again among
the survivors (new generation, new port); the dead replica's steps since the last sync are lost
(its clients' steps still count in ``steps_taken``).

Security note: this torch build's gloo has no ``TCP_TLS`` device, so the all-reduce traffic (trunk
adapter and moments, never client data or activations) is neither encrypted nor authenticated: keep
ranks on a private network. The relay is sealed on both hops (client-root and root-sub-server,
AES-256-GCM inside TLS); the root sees activations and gradients in the clear, as in sequential mode.

This package module holds only the words every part shares; nothing is imported from the submodules.
"""

from __future__ import annotations

from fedsplit.protocol import pb

__all__ = ["RELAYED", "ROOT_PREFIX", "HierarchyError"]

RELAYED = frozenset({pb.FORWARD, pb.BACKWARD, pb.OPTIMIZER_STEP})  # the only kinds the root relays
ROOT_PREFIX = "root."  # the root's sessions to a sub-server are named root.<client id>


class HierarchyError(RuntimeError):
    """The hierarchy cannot go on (no live sub-server, a group that cannot be formed)."""
