"""Starting a server-hierarchical run (FL-GLM, arXiv 2406.14898, Sec. 3.3): spec file, processes, router.

The root, in one call (:func:`start_hierarchy`)::

    host the control plane (RootControl)  ->  write directory/hierarchy.toml (SubServerSpec)
    -> start ``fedsplit subserver --root-config hierarchy.toml --rank K`` for K = 1..subservers
    -> ReplicaRouter.start(): wait for the announcements, assign the clients, form the group, push

The spec file holds everything a sub-server needs (run identity, key and TLS files, model, train
and LoRA or prefix settings, the hierarchy section); :mod:`fedsplit.recipes.subserver` runs one sub-server
from it. The parts themselves are in :mod:`fedsplit.server.hierarchy`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedsplit.adapters import LoraSettings
from fedsplit.config import HierarchyConfig, MethodConfig, ModelConfig, WireConfig
from fedsplit.security.wire import check_identifier
from fedsplit.server.hierarchy import ROOT_PREFIX
from fedsplit.server.hierarchy.control import RootControl
from fedsplit.server.hierarchy.relay import RelayCredentials
from fedsplit.server.hierarchy.router import ReplicaRouter
from fedsplit.split.parts import Trunk
from fedsplit.train.config import TrainConfig


# -- the spec file the root writes ----------------------------------------------------------------
@dataclass
class RunIdentity:
    run_id: str = field(metadata={"help": "the run the root serves"})
    config_hash: str = field(metadata={"help": "hex SHA-256 of the run configuration (handshake check)"})
    clients: list[str] = field(metadata={"help": "client ids; the root relays each as root.<id>"})
    total_steps: int = field(metadata={"help": "length of the trunk's LR schedule (all clients' steps)"})

    def __post_init__(self) -> None:
        check_identifier(self.run_id, "run.run_id", ValueError)
        if len(self.config_hash) != 64 or any(c not in "0123456789abcdef" for c in self.config_hash):
            raise ValueError(f"run.config_hash: expected 64 lowercase hex digits, got {self.config_hash!r}")
        if not self.clients or len(set(self.clients)) != len(self.clients):
            raise ValueError(f"run.clients: expected unique client ids, got {self.clients}")
        for client in self.clients:
            check_identifier(ROOT_PREFIX + client, "run.clients (as root.<id>)", ValueError)
        if self.total_steps < 1:
            raise ValueError(f"run.total_steps: expected >= 1, got {self.total_steps}")


@dataclass
class SecurityFiles:
    server_key: Path = field(metadata={"help": "server identity key (shared by the root and its sub-servers)"})
    root_public_key: Path = field(metadata={"help": "the root's own identity; admitted as root.<client>"})
    tls_key: Path | None = field(default=None, metadata={"help": "server TLS key (the root's)"})
    tls_cert: Path | None = field(default=None, metadata={"help": "server TLS certificate (the root's)"})
    ca_cert: Path | None = field(default=None,
                                 metadata={"help": "the CA that signed tls_cert (the root verifies with it)"})
    insecure: bool = field(default=False, metadata={"help": "no TLS (tests on loopback only)"})

    def __post_init__(self) -> None:
        if self.insecure == (self.tls_key is not None and self.tls_cert is not None and self.ca_cert is not None):
            raise ValueError("security: give tls_key, tls_cert and ca_cert, or insecure = true (exactly one)")


@dataclass
class SubServerSpec:
    """Everything a sub-server needs; the root writes it, ``--root-config`` names it."""

    run: RunIdentity
    security: SecurityFiles
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora_trunk: LoraSettings = field(default_factory=LoraSettings)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # prefix: the replicas train trunk prefixes, not LoRA


def write_spec(path: Path | str, spec: SubServerSpec) -> Path:
    from fedsplit.configio import dump_config

    path = Path(path)
    path.write_text(dump_config(spec))
    return path


def read_spec(path: Path | str) -> SubServerSpec:
    from fedsplit.configio import load_config

    return load_config(SubServerSpec, path)

# -- local sub-server processes ---------------------------------------------------------------------
@dataclass
class LocalSubServer:
    """A sub-server process started on this machine by :func:`launch_local`."""

    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path | None

    def alive(self) -> bool:
        return self.process.poll() is None


def launch_local(spec_path: Path, ranks: Sequence[int], *, log_dir: Path | None = None,
                 python: str = sys.executable) -> dict[int, LocalSubServer]:
    """Start ``fedsplit subserver`` (the CLI) for each rank; output goes to ``log_dir/subserver-K.log``."""
    started: dict[int, LocalSubServer] = {}
    for rank in ranks:
        log_path = None if log_dir is None else Path(log_dir) / f"subserver-{rank}.log"
        out = subprocess.DEVNULL if log_path is None else log_path.open("wb")
        command = [python, "-m", "fedsplit.cli", "subserver", "--root-config", str(spec_path), "--rank", str(rank)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
        started[rank] = LocalSubServer(rank, process, log_path)
    return started


# -- one call for the root: control plane, spec file, local sub-servers, router ----------------------
@dataclass
class Hierarchy:
    """A started hierarchy: the router (the coordinator's trunk) and the local sub-server processes."""

    router: ReplicaRouter
    spec_path: Path  # the spec file the sub-servers read (``--root-config``)
    processes: dict[int, LocalSubServer]  # local launches only

    def close(self, timeout_s: float = 30.0) -> None:
        """STOP the sub-servers and wait for their processes (killed after ``timeout_s``)."""
        self.router.close()
        for local in self.processes.values():
            try:
                local.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                local.process.kill()
                local.process.wait()


def start_hierarchy(spec: SubServerSpec, trunk: Trunk, root_identity: ed25519.Ed25519PrivateKey,
                    directory: Path | str, *, launch: bool = True) -> Hierarchy:
    """Host the control plane, write ``directory/hierarchy.toml``, start the sub-servers, start the router.

    ``hierarchy.control_port`` 0 in ``spec`` is replaced by the port actually bound. ``launch=False`` starts
    no process: run ``fedsplit subserver --root-config hierarchy.toml --rank K`` on each sub-server machine instead.
    ``trunk`` is the root's copy (LoRA, or the prefixes of ``method.name = "prefix"``, injected as the replicas
    do); it is never run.
    """
    from fedsplit.security.identity import load_private_key
    from fedsplit.security.tls import load_channel_tls

    h, sec = spec.hierarchy, spec.security
    server_key = load_private_key(sec.server_key).public_key()
    control = RootControl.listen(h.control_host, h.control_port, spec.run.run_id, root_identity, server_key,
                                 h.startup_timeout_s)
    spec = dataclasses.replace(spec, hierarchy=dataclasses.replace(h, control_port=control.port))
    path = write_spec(Path(directory) / "hierarchy.toml", spec)
    ranks = range(1, h.subservers + 1)
    processes = launch_local(path, ranks, log_dir=Path(directory)) if launch else {}
    credentials = RelayCredentials(root_identity, server_key, spec.run.run_id, bytes.fromhex(spec.run.config_hash),
                                   tls=None if sec.insecure or sec.ca_cert is None else load_channel_tls(sec.ca_cert),
                                   insecure=sec.insecure)
    router = ReplicaRouter(trunk, spec.train, spec.run.total_steps, control=control, credentials=credentials,
                           clients=spec.run.clients, config=spec.hierarchy,
                           alive={rank: local.alive for rank, local in processes.items()})
    try:
        router.start()
    except BaseException:
        for local in processes.values():
            local.process.kill()
        raise
    return Hierarchy(router, path, processes)
