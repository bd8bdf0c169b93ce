"""Round checkpoints of the FL-GLM server (arXiv 2406.14898): everything a resumed run needs.

After every completed round the coordinator writes one directory::

    <dir>/round-000002/
        tensors.safetensors  trunk adapter, trunk optimizer moments, global head/tail adapters, torch RNG
        state.json           round, run id, config hash, step counters, optimizer hyper-parameters,
                             Python and NumPy RNG states

No pickle and no ``torch.save`` (STYLE rule 7): tensors go into safetensors, the rest into JSON.
The directory is written under a hidden temporary name, every file and the directory are fsynced,
then it is renamed into place and the parent is fsynced: a crash leaves the complete checkpoint
or none (temporary directories a crash left behind are removed by the next save). ``state.json``
carries the SHA-256 of the tensors file and of its own content, checked on load, so a truncated
or bit-flipped checkpoint is refused with the file's name instead of loading silently. Only the
last ``keep_last`` checkpoints are kept. A checkpoint holding a non-finite value is never written.
Clients keep no state that a resume needs: they restart their round from the global
adapters the server sends them (their optimizer is fresh every round, see
:mod:`fedsplit.client.runner`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fedsplit.adapters import adapter_state_dict, load_adapter_state_dict
from fedsplit.split.parts import Trunk

FORMAT = "fedsplit.checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_ROUND_DIR = re.compile(r"round-(\d{6})")
_GLOBAL, _TRUNK, _OPTIMIZER, _TORCH_RNG = "global/", "trunk/", "optimizer/", "rng/torch"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the run it is loaded into."""


class TrunkHolder(Protocol):
    """What a checkpoint reads from the server's trunk service (TrunkServer, BatchingTrunkServer, ...)."""

    @property
    def trunk(self) -> Trunk: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    steps_taken: int


@dataclass(frozen=True)
class RngState:
    """The process-wide random generators (torch CPU, Python ``random``, NumPy legacy)."""

    torch: Tensor  # torch.get_rng_state(): uint8
    python: tuple[Any, ...]  # random.getstate()
    numpy: tuple[Any, ...]  # np.random.get_state(): ("MT19937", keys, pos, has_gauss, cached_gaussian)


@dataclass(frozen=True)
class TrunkState:
    """The server's trunk: its LoRA adapter, its optimizer and where it stands in the LR schedule."""

    adapters: dict[str, Tensor]  # PEFT key names
    optimizer: dict[str, Any]  # torch optimizer state_dict
    steps_taken: int


@dataclass(frozen=True)
class Checkpoint:
    """The server state after ``round`` completed rounds."""

    round: int
    run_id: str
    config_hash: str
    global_adapters: dict[str, Tensor]  # the clients' head/tail adapters after aggregation
    trunk: TrunkState
    client_steps: dict[str, int]  # optimizer steps each client has committed (its LR-schedule position)
    rng: RngState
    # the clients aggregated in round ``round``: a resumed run waits for them before its next round
    round_clients: tuple[str, ...] = ()


# -- capture and restore ------------------------------------------------------------------------
def capture_rng() -> RngState:
    # the ignore: numpy's stub gives a bare get_state() its legacy=False overload; the default returns the tuple
    return RngState(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())  # type: ignore[arg-type]


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state.torch)
    random.setstate(state.python)
    np.random.set_state(state.numpy)


def capture_trunk(server: TrunkHolder) -> TrunkState:
    """A deep copy of the trunk's trainable state (call it while no step is in flight)."""
    return TrunkState(
        adapters=adapter_state_dict(server.trunk),
        optimizer=copy.deepcopy(server.optimizer.state_dict()),
        steps_taken=server.steps_taken,
    )


def restore_trunk(server: TrunkHolder, state: TrunkState) -> None:
    load_adapter_state_dict(server.trunk, state.adapters)
    # load_state_dict keeps tensors that already have the right dtype: copy so ``state`` stays intact.
    server.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
    server.steps_taken = state.steps_taken


# -- writing ------------------------------------------------------------------------------------
def round_dir_name(round: int) -> str:
    return f"round-{round:06d}"


def save_checkpoint(directory: Path | str, checkpoint: Checkpoint, *, keep_last: int = 0) -> Path:
    """Write ``checkpoint`` atomically as ``directory/round-NNNNNN``; returns that path.

    ``keep_last`` > 0 removes all but the newest ``keep_last`` round checkpoints afterwards.
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / round_dir_name(checkpoint.round)
    tensors, state = _encode(checkpoint)
    _check_finite(tensors, final)
    _remove_stale_temporaries(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        blob = save(tensors, metadata={"format": FORMAT})
        state["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        state["state_sha256"] = _state_digest(state)
        _write_synced(tmp / TENSORS_FILE, blob)
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1, allow_nan=False).encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in sorted(_round_dirs(directory), key=lambda p: p.name)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory)
    return final


def _check_finite(tensors: Mapping[str, Tensor], where: Path) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or Inf; a poisoned state is never checkpointed")


def _state_digest(state: Mapping[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _remove_stale_temporaries(directory: Path) -> None:
    """Hidden ``.round-*`` directories are half-written checkpoints of a crashed save (one writer per run)."""
    for path in directory.iterdir():
        if path.name.startswith(".round-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _round_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if _ROUND_DIR.fullmatch(p.name) and p.is_dir()]


def _encode(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {_GLOBAL + k: v for k, v in checkpoint.global_adapters.items()}
    tensors.update({_TRUNK + k: v for k, v in checkpoint.trunk.adapters.items()})
    optimizer_tensors, optimizer_json = _flatten_optimizer(checkpoint.trunk.optimizer)
    tensors.update(optimizer_tensors)
    tensors[_TORCH_RNG] = checkpoint.rng.torch
    version, mt_state, gauss = checkpoint.rng.python
    name, keys, pos, has_gauss, cached = checkpoint.rng.numpy
    state = {
        "format": FORMAT,
        "version": VERSION,
        "round": checkpoint.round,
        "run_id": checkpoint.run_id,
        "config_hash": checkpoint.config_hash,
        "client_steps": dict(sorted(checkpoint.client_steps.items())),
        "round_clients": sorted(checkpoint.round_clients),
        "trunk_steps_taken": checkpoint.trunk.steps_taken,
        "optimizer": optimizer_json,
        "rng": {
            "python": [version, list(mt_state), gauss],
            "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        },
    }
    return {k: v.detach().contiguous() for k, v in tensors.items()}, state


def _flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer tensors under ``optimizer/<param index>/<name>``; everything else as JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIMIZER}{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a rerun of that round) is moved aside first."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------
def latest_checkpoint(directory: Path | str) -> Path | None:
    """The checkpoint of the highest completed round in ``directory``, or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [p for p in _round_dirs(directory) if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name, default=None)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    from safetensors.torch import load

    path = Path(path)
    for name in (STATE_FILE, TENSORS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name}; expected a checkpoint directory written by save_checkpoint")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path / STATE_FILE}: not valid JSON ({exc}); the file is truncated or corrupted"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        got = (state.get("format"), state.get("version")) if isinstance(state, dict) else (type(state).__name__, None)
        raise CheckpointError(
            f"{path / STATE_FILE}: expected format {FORMAT!r} version {VERSION}, got {got[0]!r} version {got[1]!r}"
        )
    if state.get("state_sha256") != _state_digest(state):
        raise CheckpointError(
            f"{path / STATE_FILE}: SHA-256 of its content does not match: the file was altered or corrupted"
        )
    blob = (path / TENSORS_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != state.get("tensors_sha256"):
        raise CheckpointError(
            f"{path / TENSORS_FILE}: SHA-256 does not match state.json: the file is truncated, "
            "altered or from another checkpoint"
        )
    try:
        tensors = load(blob)
        return _decode(state, tensors, path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(exc).__name__}: {exc})") from None


def _decode(state: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> Checkpoint:
    if _TORCH_RNG not in tensors:
        raise CheckpointError(f"{path / TENSORS_FILE}: no {_TORCH_RNG!r} tensor")
    version, mt_state, gauss = state["rng"]["python"]
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    trunk = TrunkState(
        adapters=_with_prefix(tensors, _TRUNK),
        optimizer=_unflatten_optimizer(tensors, state["optimizer"]),
        steps_taken=int(state["trunk_steps_taken"]),
    )
    return Checkpoint(
        round=int(state["round"]),
        run_id=str(state["run_id"]),
        config_hash=str(state["config_hash"]),
        global_adapters=_with_prefix(tensors, _GLOBAL),
        trunk=trunk,
        client_steps={str(k): int(v) for k, v in state["client_steps"].items()},
        round_clients=tuple(str(c) for c in state.get("round_clients", [])),
        rng=RngState(
            torch=tensors[_TORCH_RNG],
            python=(version, tuple(mt_state), gauss),
            numpy=(name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        ),
    )


def _with_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    entries = list(_with_prefix(tensors, _OPTIMIZER).items()) + list(meta["scalars"].items())
    for key, value in entries:
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON has no tuples: hyper-parameters such as AdamW's betas come back as lists.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
