"""Each party loads only the parts it holds (FL-GLM, arXiv 2406.14898: clients hold head and tail).

A client needs the embeddings, the head blocks, the tail blocks, the final norm and the LM head; the
server needs the trunk blocks. Loading the whole model and deleting the rest would still make every
client hold the whole model once. Instead:

    config.json -> the model's skeleton on the meta device (no memory)
    safetensors (safe_open: reads only the named tensors) -> the held modules' weights, nothing else
    rotary embeddings (computed buffers, in no checkpoint) -> rebuilt on the CPU
    split_model(skeleton) -> head, trunk, tail; a part not held keeps meta weights and cannot run

Tied embeddings (SmolLM2, GPT-2): the LM head reads the embedding matrix from the checkpoint; a
process holding both (a client) shares one tensor between them, as ``from_pretrained`` does.

A part that is not held can still carry a LoRA adapter (the server keeps the clients' global
head/tail adapters for FedAvg and saves them): only its adapted linear layers are read, so PEFT
creates the adapter on the CPU exactly as on the full model. Models without a safetensors
checkpoint (``tiny-*`` and ``stories260k``, built in memory and tiny) are loaded whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsplit.models.errors import ModelLoadError
from fedsplit.split.arch import ArchSpec, arch_spec
from fedsplit.split.parts import SplitParts, split_model, validate_cut
from fedsplit.train.config import LoraSettings

log = logging.getLogger(__name__)

PARTS = ("head", "trunk", "tail")
ROLES: Mapping[str, tuple[str, ...]] = {"client": ("head", "tail"), "server": ("trunk",)}
ROLE_ADAPTERS: Mapping[str, tuple[str, ...]] = {"client": ("head", "tail"), "server": PARTS}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# -- where the weights are ------------------------------------------------------------------------
def weights_dir(name: str) -> Path | None:
    """The directory of ``name``'s safetensors checkpoint, or None when it has none (then load it whole)."""
    from fedsplit.models.gguf import load_smollm2_135m, smollm2_cache_dir

    if name == "smollm2-135m":
        cached = smollm2_cache_dir()
        if not cached.is_dir():  # first use: the one-off GGUF conversion writes the cache
            load_smollm2_135m()
        return cached
    path = Path(name).expanduser()
    if path.is_dir():
        return path if _has_safetensors(path) else None
    if "/" in name:  # a hub id already in the local Hugging Face cache (never the network)
        try:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: load_model's own path reports why
            return None
        return snapshot if _has_safetensors(snapshot) else None
    return None


def _has_safetensors(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / _SINGLE).is_file() or (path / _INDEX).is_file())


def checkpoint_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards of an index)."""
    from safetensors import safe_open

    if (directory / _INDEX).is_file():
        weight_map = json.loads((directory / _INDEX).read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    with safe_open(str(directory / _SINGLE), framework="pt") as handle:
        return {key: directory / _SINGLE for key in handle.keys()}  # noqa: SIM118 - safe_open is not a Mapping


# -- which modules a part needs ---------------------------------------------------------------------
def part_modules(spec: ArchSpec, num_layers: int, head_layers: int, tail_layers: int, part: str) -> list[str]:
    """Module paths (from the ``*ForCausalLM`` root) whose weights ``part`` needs."""
    blocks = {"head": range(head_layers), "trunk": range(head_layers, num_layers - tail_layers),
              "tail": range(num_layers - tail_layers, num_layers)}[part]
    extras = {"head": (spec.embed, spec.position_embed), "trunk": (), "tail": (spec.norm, spec.lm_head)}[part]
    return [path for path in extras if path] + [f"{spec.layers}.{index}" for index in blocks]


def lora_modules(spec: ArchSpec, module: nn.Module, root: str, settings: LoraSettings) -> list[str]:
    """The linear layers LoRA adapts below ``root`` (the rule of :func:`fedsplit.adapters.add_lora`)."""
    suffixes = settings.target_modules or spec.lora_targets
    return [f"{root}.{name}" for name, _ in module.get_submodule(root).named_modules()
            if name and name.rsplit(".", 1)[-1] in suffixes]


# -- materializing -------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, key: str, value: torch.Tensor | nn.Parameter) -> None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise ModelLoadError(f"{key}: no such parameter or buffer in {type(model).__name__}")


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """{tied key: the key it reads}, e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}`` when tied."""
    config: Any = model.config  # a PretrainedConfig (nn.Module types attributes as Tensor | Module)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = getattr(model, "_tied_weights_keys", None)
    if not getattr(config, "tie_word_embeddings", False) or not isinstance(tied, Mapping):
        return {}
    return dict(tied)


def materialize(model: nn.Module, directory: Path, modules: Sequence[str], dtype: torch.dtype) -> int:
    """Read the weights of ``modules`` (and nothing else) from the checkpoint in ``directory`` into the
    meta skeleton ``model``; returns how many tensors were read."""
    from safetensors import safe_open

    index, tied = checkpoint_index(directory), _tied_sources(model)
    wanted = sorted({f"{path}.{name}" for path in modules
                     for name, _ in model.get_submodule(path).named_parameters(recurse=True)}
                    | {f"{path}.{name}" for path in modules
                       for name, _ in model.get_submodule(path).named_buffers(recurse=True)})
    sources = {key: key if key in index else tied.get(key, key) for key in wanted}
    missing = [key for key, source in sources.items() if source not in index]
    if missing:
        raise ModelLoadError(f"{directory}: the checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    loaded: dict[str, torch.Tensor | nn.Parameter] = {}
    for file in sorted({index[source] for source in sources.values()}):
        with safe_open(str(file), framework="pt") as handle:
            for key, source in sources.items():
                if index[source] != file:
                    continue
                if source in loaded:  # tied: one tensor for both (the embedding and the LM head)
                    _set_tensor(model, key, loaded[source])
                    continue
                _set_tensor(model, key, handle.get_tensor(source).to(dtype))
                loaded[source] = model.get_parameter(key) if _is_parameter(model, key) else model.get_buffer(key)
    return len(sources)


def _is_parameter(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def _rebuild_rotary(model: nn.Module, spec: ArchSpec, dtype: torch.dtype) -> None:
    """Rotary embeddings hold computed buffers only (no checkpoint entry): build them on the CPU."""
    if not spec.rotary:
        return
    owner, _, leaf = spec.rotary.rpartition(".")
    meta_rotary = model.get_submodule(spec.rotary)
    model.get_submodule(owner).add_module(leaf, type(meta_rotary)(config=model.config).to(dtype))


def _skeleton(directory: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _still_meta(module: nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


# -- the entry points ------------------------------------------------------------------------------
def load_parts(
    name: str,
    head_layers: int,
    tail_layers: int,
    *,
    hold: Collection[str],
    lora_only: Mapping[str, LoraSettings] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """(tokenizer, parts): ``name`` cut into head, trunk and tail with only the ``hold`` parts' weights read.

    ``lora_only``: parts not held that will carry a LoRA adapter, with its settings; only their
    adapted linear layers are read. Every other module of a part not held stays on the meta device.
    The held parts equal, bit for bit, the parts :func:`~fedsplit.split.split_model` cuts from
    :func:`~fedsplit.models.load_model`'s whole model.
    """
    from transformers import AutoTokenizer

    from fedsplit.models.loading import ensure_pad_token, load_model

    unknown = set(hold) - set(PARTS)
    if unknown:
        raise ValueError(f"hold: expected parts among {PARTS}, got {sorted(unknown)}")
    directory = weights_dir(name)
    if directory is None:
        log.info("%s has no safetensors checkpoint: loading it whole", name)
        model, tokenizer = load_model(name, dtype=dtype)
        return tokenizer, split_model(model, head_layers, tail_layers)
    model = _skeleton(directory, dtype)
    spec = arch_spec(model.config.model_type)
    num_layers = len(model.get_submodule(spec.layers))
    validate_cut(num_layers, head_layers, tail_layers)
    modules = [path for part in PARTS if part in hold
               for path in part_modules(spec, num_layers, head_layers, tail_layers, part)]
    for part, settings in (lora_only or {}).items():
        if part not in hold:
            modules += [linear for block in part_modules(spec, num_layers, head_layers, tail_layers, part)
                        if block.startswith(spec.layers + ".") for linear in lora_modules(spec, model, block, settings)]
    count = materialize(model, directory, modules, dtype)
    _rebuild_rotary(model, spec, dtype)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(directory))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    parts = split_model(model, head_layers, tail_layers)
    for part in hold:
        left = _still_meta(getattr(parts, part))
        if left:
            raise ModelLoadError(f"{name}: the {part} still has unloaded tensors {left[:3]} after a partial load")
    log.info("%s: read %d tensors for %s from %s", name, count, "+".join(p for p in PARTS if p in hold), directory)
    return tokenizer, parts


def load_role_parts(
    name: str, head_layers: int, tail_layers: int, role: str, lora: Sequence[LoraSettings], *, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[object, SplitParts]:
    """What ``role`` (``"client"``: head + tail; ``"server"``: trunk) holds, with LoRA on the parts it
    keeps an adapter of (the server: all three; the clients' global head/tail adapters without their
    weights). Part ``i`` gets ``seed + i``, as :func:`fedsplit.adapters.add_part_adapters` does."""
    from fedsplit.adapters import add_lora

    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    settings = dict(zip(PARTS, lora, strict=True))
    adapted = ROLE_ADAPTERS[role]
    tokenizer, parts = load_parts(name, head_layers, tail_layers, hold=ROLES[role],
                                  lora_only={part: settings[part] for part in adapted}, dtype=dtype)
    for index, part in enumerate(PARTS):
        if part in adapted:
            add_lora(getattr(parts, part), settings[part], seed=seed + index)
    return tokenizer, parts
