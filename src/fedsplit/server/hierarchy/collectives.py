"""The collectives of server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3).

A replica's trainable trunk state (LoRA weights or P-tuning v2 prefixes, and AdamW moments) as one
float64 vector, the averaging all-reduce and the gather over it, and the process groups they run in
(one generation at a time: a group is formed again, on a new port, after a member died). Every rank
calls the same collective with the same arguments where the docstring says so; the root is rank 0.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsplit.adapters import adapter_state_dict
from fedsplit.server.hierarchy import HierarchyError
from fedsplit.split.parts import Trunk


class SyncMode(enum.Enum):
    AVERAGE = "average"  # replicas weighted by their steps since the last sync; the root weighs 0
    PUSH = "push"  # the root weighs 1, the replicas 0: copy the root's state everywhere


def ensure_adam_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
    """Create AdamW's state (step 0, zero moments) for parameters that never stepped, as AdamW would."""
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("capturable") or group.get("fused"):
            raise HierarchyError("replica averaging supports plain AdamW (no amsgrad, capturable or fused)")
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=scalar)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass(frozen=True)
class ReplicaState:
    """One rank's trainable trunk state, by PEFT key (for inspection and tests)."""

    adapters: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    steps_taken: int
    steps_since: int


class TrainableState:
    """A trunk's adapter tensors (LoRA weights or P-tuning v2 prefixes) and AdamW state as one float64 vector
    (the all-reduce payload).

    Per parameter, in ``trainable_parameters`` order: ``[weights, exp_avg, exp_avg_sq, step]``.
    """

    def __init__(self, trunk: Trunk, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(trunk).items()}
        if [tuple(p.shape) for p in params] != list(shapes.values()):
            raise HierarchyError("the optimizer's parameters are not the trunk's adapter (LoRA / prefix) tensors "
                                 "in order")
        self.names, self.params, self.optimizer = list(shapes), list(params), optimizer
        self.layout = hashlib.sha256(json.dumps(list(shapes.items())).encode()).hexdigest()
        self.numel = sum(3 * p.numel() + 1 for p in self.params)

    def flatten(self) -> torch.Tensor:
        ensure_adam_state(self.optimizer, self.params)
        pieces = []
        for p in self.params:
            state = self.optimizer.state[p]
            pieces += [p.detach().reshape(-1), state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1),
                       state["step"].reshape(1)]
        return torch.cat([x.to(torch.float64) for x in pieces])  # (numel,)

    def load(self, flat: torch.Tensor) -> None:
        ensure_adam_state(self.optimizer, self.params)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                state, n = self.optimizer.state[p], p.numel()
                for target in (p, state["exp_avg"], state["exp_avg_sq"]):
                    target.copy_(flat[offset : offset + n].view(p.shape))
                    offset += n
                state["step"].fill_(float(flat[offset]))
                offset += 1

    def unflatten(self, flat: torch.Tensor, steps_taken: int, steps_since: int) -> ReplicaState:
        out: dict[str, dict[str, Any]] = {"adapters": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        offset = 0
        for name, p in zip(self.names, self.params, strict=True):
            n = p.numel()
            for part in ("adapters", "exp_avg", "exp_avg_sq"):
                out[part][name] = flat[offset : offset + n].view(p.shape).to(p.dtype).clone()
                offset += n
            out["step"][name] = float(flat[offset])
            offset += 1
        return ReplicaState(**out, steps_taken=steps_taken, steps_since=steps_since)

    def digest(self) -> str:
        return hashlib.sha256(self.flatten().numpy().tobytes()).hexdigest()


class ReduceStatus(enum.Enum):
    DONE = "done"
    NOTHING_TO_DO = "nothing_to_do"  # AVERAGE with no step anywhere since the last sync
    NOT_READY = "not_ready"  # a rank was mid-step: nobody changed anything
    LAYOUT_MISMATCH = "layout_mismatch"


@dataclass(frozen=True)
class ReduceOutcome:
    status: ReduceStatus
    total_steps: int = 0  # N: steps since the last sync over all ranks
    steps_taken: int = 0  # the LR-schedule position every rank now has


@dataclass(frozen=True)
class SyncReport:
    """What one sync of the root and its replicas did."""

    ok: bool
    mode: SyncMode
    generation: int
    members: tuple[int, ...]
    status: str  # a ReduceStatus value, or "failed"
    total_steps: int  # N: steps averaged
    steps_taken: int
    duration_s: float
    discarded: tuple[str, ...] = ()  # clients whose started step was dropped to drain
    error: str = ""


def reduce_state(
    state: TrainableState, *, group_rank: int, mode: SyncMode, ready: bool, steps_since: int,
    steps_taken: int, device: torch.device | str = "cpu",
) -> ReduceOutcome:
    """The averaging collective; every member of the process group calls it with the same ``mode``.

    Phase 1 all-reduces a header ``[not ready, n_k, layout size, root's steps_taken]`` so that every
    rank takes the same decision; phase 2 all-reduces ``w_k * state_k``. Raises on a collective error
    (a dead peer, the group timeout), leaving this rank's state unchanged.
    """
    import torch.distributed as dist

    root_steps = float(steps_taken) if group_rank == 0 else 0.0
    header = torch.tensor([0.0 if ready else 1.0, float(steps_since), float(state.numel), root_steps],
                          dtype=torch.float64)
    header = _all_reduce(header, device)
    not_ready, total, numel, new_steps = header.tolist()
    if not_ready > 0:
        return ReduceOutcome(ReduceStatus.NOT_READY)
    if numel != dist.get_world_size() * state.numel:
        return ReduceOutcome(ReduceStatus.LAYOUT_MISMATCH)
    if mode is SyncMode.AVERAGE and total == 0:
        return ReduceOutcome(ReduceStatus.NOTHING_TO_DO, 0, int(new_steps))
    weight = steps_since / total if mode is SyncMode.AVERAGE else float(group_rank == 0)
    state.load(_all_reduce(state.flatten() * weight, device))
    return ReduceOutcome(ReduceStatus.DONE, int(total), int(new_steps))


def gather_state(state: TrainableState, *, group_rank: int, steps_taken: int, steps_since: int,
                 device: torch.device | str = "cpu") -> list[torch.Tensor] | None:
    """Every rank's ``[steps_taken, steps_since, state...]`` at rank 0 (``None`` elsewhere)."""
    import torch.distributed as dist

    flat = torch.cat([torch.tensor([float(steps_taken), float(steps_since)], dtype=torch.float64), state.flatten()])
    flat = flat.to(device)
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())] if group_rank == 0 else None
    dist.gather(flat, gather_list=out, dst=0)
    return None if out is None else [t.cpu() for t in out]


def _all_reduce(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    import torch.distributed as dist

    moved = tensor.to(device)
    dist.all_reduce(moved)  # SUM
    return moved.cpu()


# == process groups: one generation at a time ====================================================
@dataclass(frozen=True)
class GroupSpec:
    generation: int
    host: str
    port: int
    rank: int  # 0 = root
    world_size: int
    backend: str
    timeout_s: float

    @property
    def device(self) -> torch.device:
        if self.backend != "nccl":
            return torch.device("cpu")
        return torch.device("cuda", self.rank % torch.cuda.device_count())


def join_group(spec: GroupSpec) -> None:
    """Leave the current process group (if any) and join generation ``spec.generation``."""
    import torch.distributed as dist

    leave_group()
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.device)
    dist.init_process_group(
        spec.backend, init_method=f"tcp://{spec.host}:{spec.port}", rank=spec.rank, world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )


def in_group() -> bool:
    """Whether this process still holds a process group (another owner in the process may have left it)."""
    import torch.distributed as dist

    return bool(dist.is_initialized())


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def choose_backend(requested: str, world_size: int) -> str:
    """``auto``: nccl when this machine has a GPU for every rank, else gloo."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

