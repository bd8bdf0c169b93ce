"""One copy of the frozen trunk per machine: base weights memory-mapped read-only from safetensors.

In server-hierarchical training (FL-GLM, arXiv 2406.14898, Sec. 3.3; :mod:`fedsplit.server.hierarchy`)
K sub-server processes on one machine each hold a replica of the trunk. Only the LoRA adapter and
its optimizer state differ between replicas; the base blocks are frozen. So the base tensors are
not loaded into private memory: each is a view of the model's safetensors file, mapped with
``mmap`` (``safetensors.safe_open(...).get_tensor`` on CPU returns exactly that), and every process
that maps the file reads the same physical pages of the page cache. K sub-servers therefore cost
about one base model of RAM plus K small adapters, not K base models.

    config.json --AutoModelForCausalLM.from_config--> model on the meta device (no memory)
    -> rotary embeddings rebuilt on the CPU (their buffers are computed, not stored)
    -> split_model -> trunk; its state dict keys -> safe_open(...).get_tensor(key): mmap views
    -> trunk.load_state_dict(views, assign=True): the module now *is* the file's pages

The mapping is private copy-on-write (``MAP_PRIVATE``): a write would copy that one page into the
writing process and never reach the file or the other processes. Nothing writes: the base weights
are frozen and LoRA adds its own tensors. ``mapped_file`` and ``mapping_memory`` let tests and
benchmarks check both claims (the tensor lies in a file mapping; the mapping's pages are shared).
Linux only for those two helpers (they read ``/proc``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsplit.split.parts import Trunk

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SharedWeightsError(ValueError):
    """The model cannot be loaded as shared, memory-mapped weights; the message says why."""


# -- where the weights are ----------------------------------------------------------------------
def resolve_weights_dir(name_or_dir: str | os.PathLike[str]) -> Path:
    """The directory holding ``config.json`` and safetensors weights for a model name.

    ``"smollm2-135m"`` is fedsplit's fp32 safetensors cache (converted from the bundled GGUF on first
    use, see :mod:`fedsplit.models.gguf`); anything else must be a local Hugging Face model directory.
    Tiny random models have no weight files: ``save_pretrained`` them to a directory first.
    """
    name = os.fspath(name_or_dir)
    if name == "smollm2-135m":
        from fedsplit.models.gguf import load_smollm2_135m, smollm2_cache_dir

        if not smollm2_cache_dir().is_dir():
            load_smollm2_135m()  # converts once and writes the cache
        return smollm2_cache_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SharedWeightsError(
            f"{name!r}: expected 'smollm2-135m' or a model directory with config.json and safetensors "
            "weights (save a tiny or hub model there with model.save_pretrained(dir))"
        )
    return path


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from ``model.safetensors`` or a sharded index."""
    from safetensors import safe_open

    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise SharedWeightsError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; "
                                 "only safetensors weights can be shared")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


# -- loading ------------------------------------------------------------------------------------
def load_shared_trunk(
    model_dir: str | os.PathLike[str], head_layers: int, tail_layers: int, *, dtype: torch.dtype = torch.float32
) -> Trunk:
    """The trunk (blocks ``head_layers .. N - tail_layers``) with its base weights mapped from disk.

    The result equals ``split_model(load_model(model_dir), head_layers, tail_layers).trunk`` bit for
    bit, but its frozen tensors are views of the safetensors file (no private copy). ``dtype`` must
    be the file's dtype: a conversion would need a private copy, which is what this module avoids.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedsplit.split import split_model

    directory = resolve_weights_dir(model_dir)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # shapes only, no memory
    _rebuild_rotary(model)
    trunk = split_model(model, head_layers, tail_layers).trunk
    views = _mapped_views(weight_files(directory), trunk.state_dict().keys(), dtype)
    trunk.load_state_dict(views, strict=True, assign=True)
    _check_materialized(trunk, directory)
    trunk.requires_grad_(False)
    return trunk.eval()


def _rebuild_rotary(model: torch.nn.Module) -> None:
    """Rotary embeddings keep computed (non-persistent) buffers: build them for real, on the CPU."""
    from fedsplit.split import arch_spec

    config: Any = model.config  # a transformers PretrainedConfig
    path = arch_spec(config.model_type).rotary
    if not path:
        return
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    meta_rotary = parent.get_submodule(leaf)
    try:
        rotary = type(meta_rotary)(config=config)
    except TypeError as exc:
        raise SharedWeightsError(f"cannot rebuild {type(meta_rotary).__name__} from the config: {exc}") from exc
    setattr(parent, leaf, rotary)


def _mapped_views(files: dict[str, Path], keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    wanted = list(keys)
    missing = sorted(k for k in wanted if k not in files)
    if missing:
        raise SharedWeightsError(f"the weight files lack {len(missing)} trunk tensors, e.g. {missing[:3]}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in wanted:
        by_file[files[key]].append(key)
    views: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                views[name] = f.get_tensor(name)  # a view of the file's pages (MAP_PRIVATE)
    wrong = sorted({str(v.dtype) for v in views.values() if v.is_floating_point() and v.dtype != dtype})
    if wrong:
        raise SharedWeightsError(
            f"the weight files hold {wrong}, expected {dtype}: converting would make a private copy per "
            "process; load with the file's dtype (fedsplit's SmolLM2 cache is float32)"
        )
    return views


def _check_materialized(trunk: Trunk, directory: Path) -> None:
    left = [n for n, t in [*trunk.named_parameters(), *trunk.named_buffers()] if t.device.type == "meta"]
    if left:
        raise SharedWeightsError(f"{directory}: trunk tensors {left[:3]} are neither in the weight files nor rebuilt")


# -- checking that memory is shared (Linux /proc) -----------------------------------------------
def mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose mapping holds ``tensor``'s first byte in this process, or ``None`` (private memory)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) == 6 else ""
                return Path(path) if path.startswith("/") else None
    return None


@dataclass(frozen=True)
class MappingMemory:
    """Resident memory of one file's mappings in one process, from ``/proc/<pid>/smaps`` (bytes)."""

    rss: int  # resident pages, counted in full even if other processes map them too
    pss: int  # each resident page divided by the number of processes mapping it
    shared: int  # resident pages other processes map too (Shared_Clean + Shared_Dirty)
    private: int  # resident pages only this process maps (Private_Clean + Private_Dirty)
    copied: int  # pages this process wrote to, i.e. copy-on-write copies (smaps "Anonymous"); should be 0


def mapping_memory(pid: int, path: str | os.PathLike[str]) -> MappingMemory:
    """Sum of ``Rss``/``Pss``/private/copied pages over the mappings of ``path`` in process ``pid``.

    A page of a freshly written file counts as ``Private_Dirty`` until the kernel writes it back, so
    "was it written by this process" is ``Anonymous`` (a copy-on-write copy), not ``Private_Dirty``.
    """
    target = os.path.realpath(path)
    totals: dict[str, int] = defaultdict(int)
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping header line
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and head[0].endswith(":"):
                totals[head[0][:-1]] += int(head[1]) * 1024 if len(head) > 1 and head[1].isdigit() else 0
    shared = totals["Shared_Clean"] + totals["Shared_Dirty"]
    private = totals["Private_Clean"] + totals["Private_Dirty"]
    return MappingMemory(totals["Rss"], totals["Pss"], shared, private, totals["Anonymous"])


@dataclass(frozen=True)
class ProcessMemory:
    """Whole-process memory (bytes): RSS double-counts shared pages, PSS splits them, USS is private."""

    rss: int
    pss: int
    uss: int


def process_memory(pid: int) -> ProcessMemory:
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return ProcessMemory(rss=int(info.rss), pss=int(info.pss), uss=int(info.uss))
