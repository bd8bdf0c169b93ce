"""One sub-server process of a server-hierarchical run (FL-GLM, arXiv 2406.14898, Sec. 3.3).

    fedsplit subserver --root-config hierarchy.toml --rank K

reads the spec file the root wrote (:mod:`fedsplit.recipes.hierarchy`), then, top to bottom:
load the trunk replica (base weights memory-mapped, :mod:`fedsplit.server.shared_weights`; the
seeded LoRA, or with ``method.name = "prefix"`` the seeded P-tuning v2 prefixes, every replica and the
root share) -> a TrunkServer -> serve the root's relay sessions
on its own gRPC endpoint (the root's TLS material and server identity) -> connect to the root's
control plane and announce the endpoint -> follow the root's messages until STOP
(:class:`~fedsplit.server.hierarchy.replica.SubServer`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import torch

from fedsplit.adapters import add_lora
from fedsplit.protocol import pb
from fedsplit.recipes.hierarchy import SubServerSpec
from fedsplit.server.hierarchy import ROOT_PREFIX
from fedsplit.server.hierarchy.collectives import leave_group
from fedsplit.server.hierarchy.control import SubControl
from fedsplit.server.hierarchy.replica import SubServer
from fedsplit.server.trunk import TrunkServer
from fedsplit.split.parts import Trunk

if TYPE_CHECKING:
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.transport.grpc_server import GrpcServer

log = logging.getLogger(__name__)

TRUNK_PART_INDEX = 1  # add_part_adapters / build_prefix_parts seed part i with seed + i: the trunk is part 1


def build_replica_trunk(spec: SubServerSpec) -> Trunk:
    """The trunk (base weights shared unless ``hierarchy.shared_weights`` is off) with the seeded LoRA
    (or, ``method.name = "prefix"``, P-tuning v2 prefix) init every replica and the root share."""
    from fedsplit.server.shared_weights import SharedWeightsError, load_shared_trunk, resolve_weights_dir

    m = spec.model
    mappable = True
    try:
        resolve_weights_dir(m.name)
    except SharedWeightsError as exc:  # e.g. the in-memory tiny-* test models: nothing on disk to map
        mappable = False
        if spec.hierarchy.shared_weights:
            log.warning("shared weights off for %s: %s", m.name, exc)
    if spec.hierarchy.shared_weights and mappable:
        trunk = load_shared_trunk(m.name, m.head_layers, m.tail_layers)
    else:
        from fedsplit.models import load_model
        from fedsplit.split import split_model

        trunk = split_model(load_model(m.name)[0], m.head_layers, m.tail_layers).trunk
    seed = spec.train.seed + TRUNK_PART_INDEX
    if spec.method.name == "prefix":  # as fedsplit.recipes.prefix_network.build_prefix_parts does on the root
        from fedsplit.split.prefix import add_prefix

        add_prefix(trunk, spec.method.num_virtual_tokens, seed=seed, init_std=spec.method.init_std)
    else:
        add_lora(trunk, spec.lora_trunk, seed=seed)
    return trunk


def _verifier(spec: SubServerSpec) -> HandshakeVerifier:
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.security.identity import load_private_key, load_public_key

    root_key = load_public_key(spec.security.root_public_key)
    admitted = {ROOT_PREFIX + client: root_key for client in spec.run.clients}
    return HandshakeVerifier(load_private_key(spec.security.server_key), admitted, [], pb.PROTOCOL_VERSION_CURRENT,
                             bytes.fromhex(spec.run.config_hash), run_id=spec.run.run_id)


def serve(replica: SubServer, spec: SubServerSpec, rank: int) -> GrpcServer:
    """Start the replica's gRPC endpoint (the root's TLS material and identity)."""
    from fedsplit.security.tls import load_server_tls
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import SessionFactory

    h, sec = spec.hierarchy, spec.security
    port = h.listen_port_base + rank if h.listen_port_base else 0
    factory = SessionFactory(_verifier(spec), replica.handler_for, spec.run.run_id)
    tls = None if sec.insecure else load_server_tls(sec.tls_key, sec.tls_cert)  # type: ignore[arg-type]
    return GrpcServer(f"{h.listen_host}:{port}", factory, tls=tls, insecure=sec.insecure, max_streams=h.max_streams,
                      idle_timeout_s=24 * 3600.0, on_disconnect=replica.on_disconnect).start()


def run_subserver(spec: SubServerSpec, rank: int) -> int:
    """Load the replica, serve it, announce it to the root, follow the root until STOP."""
    from fedsplit.security.identity import load_private_key, load_public_key

    h = spec.hierarchy
    if not 1 <= rank <= h.subservers:
        raise ValueError(f"rank: expected 1..{h.subservers}, got {rank}")
    torch.set_num_threads(h.threads_per_subserver())
    # Averaging K replicas that each took n steps moves the trunk about as far as n steps, where one
    # sequential trunk would have taken K n: the linear scaling rule gives each replica K x the LR.
    train = dataclasses.replace(spec.train, lr=spec.train.lr * h.subservers) if h.scale_lr else spec.train
    server = TrunkServer(build_replica_trunk(spec), train, spec.run.total_steps, lease_timeout_s=h.relay_deadline_s,
                         wire_dtype=spec.wire.torch_dtype())
    replica = SubServer(rank, server, quiesce_timeout_s=h.sync_timeout_s)
    endpoint = serve(replica, spec, rank)
    try:
        control = SubControl.connect(h.control_host, h.control_port, spec.run.run_id, rank,
                                     load_private_key(spec.security.server_key),
                                     load_public_key(spec.security.root_public_key), h.startup_timeout_s)
        control.announce(f"{h.listen_host}:{endpoint.port}")
        log.info("sub-server %d (pid %d) serving on port %d with %d threads", rank, os.getpid(), endpoint.port,
                 torch.get_num_threads())
        return replica.run(control)
    finally:
        endpoint.stop(0)
        leave_group()

