"""LoRA adapters on each split part, saved and loaded in the standard PEFT format.

Each part keeps the unsplit model's module names (see :mod:`fedsplit.split.parts`), so the
adapter of a part uses exactly the keys PEFT would use on the unsplit model
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``). The three part adapters
therefore merge into one adapter that ``peft.PeftModel.from_pretrained(unsplit_model, dir)``
loads as is. ``adapter_state_dict`` is also exactly the payload federated averaging needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fedsplit.split.parts import SplitPart
from fedsplit.train.config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


class AdapterError(ValueError):
    """An adapter does not fit the part it is loaded into."""


def _targets(part: SplitPart, settings: LoraSettings) -> list[str]:
    """Full module names inside ``part`` whose last component is a target suffix."""
    suffixes = settings.target_modules or part.spec.lora_targets
    # Only modules inside decoder blocks: blocks are shared with the unsplit model, so an adapter
    # injected into a part is the very adapter the unsplit model sees (centralized baseline).
    prefix = part.spec.layers + "."
    names = [
        name
        for name, _ in part.named_modules()
        if name.startswith(prefix) and name.rsplit(".", 1)[-1] in suffixes
    ]
    if not names:
        raise AdapterError(
            f"no module of the {type(part).__name__.lower()} (blocks {part.start}..{part.stop - 1}) "
            f"matches LoRA targets {list(suffixes)}"
        )
    return names


def _peft_config(part: SplitPart, settings: LoraSettings, names: Sequence[str], base_model: str | None):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it only divides by r
        lora_dropout=settings.dropout,
        # A full-match regex of exact module names: loaded into the unsplit model, the adapter wraps
        # only this part's modules.
        target_modules="|".join(re.escape(n) for n in names),
        fan_in_fan_out=part.spec.fan_in_fan_out,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        bias="none",
    )


def add_lora(part: SplitPart, settings: LoraSettings, *, seed: int = 0) -> list[str]:
    """Freeze ``part`` and inject LoRA into its target modules; returns the adapted module names.

    Initialization is deterministic in ``seed`` and does not touch the global RNG.
    """
    import warnings

    from peft import inject_adapter_in_model

    names = _targets(part, settings)
    config = _peft_config(part, settings, names, None)
    for param in part.parameters():
        param.requires_grad_(False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, part, adapter_name=_ADAPTER)
    for name, param in part.named_parameters():
        param.requires_grad_("lora_" in name)
    # plain attributes, set as nn.Module.__setattr__ would (its annotation admits only Tensor | Module)
    vars(part).update(lora_settings=settings, lora_names=names)
    return names


def _lora_of(part: nn.Module) -> tuple[LoraSettings, list[str]]:
    """The settings and adapted module names :func:`add_lora` recorded on ``part``."""
    try:
        return vars(part)["lora_settings"], vars(part)["lora_names"]
    except KeyError:
        raise AdapterError(f"the {type(part).__name__.lower()} has no LoRA adapter: call add_lora first") from None


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _is_adapter(name: str) -> bool:
    """A trained adapter weight: LoRA, or a P-tuning v2 prefix (``prefix_tuning.key.3``, fedsplit.split.prefix)."""
    return "lora_" in name or name.startswith("prefix_tuning.")


def _to_peft_key(name: str) -> str:
    return _PEFT_PREFIX + name.replace(f".{_ADAPTER}.", ".")


def adapter_state_dict(part: nn.Module) -> dict[str, torch.Tensor]:
    """The part's LoRA weights under PEFT's saved key names (detached copies)."""
    return {
        _to_peft_key(name): param.detach().clone()
        for name, param in part.named_parameters()
        if _is_adapter(name)
    }


def adapter_parameters(part: nn.Module) -> dict[str, nn.Parameter]:
    """The part's LoRA parameters themselves under PEFT's key names (the keys of ``adapter_state_dict``)."""
    return {_to_peft_key(name): param for name, param in part.named_parameters() if _is_adapter(name)}


def load_adapter_state_dict(part: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (PEFT key names) into the part's LoRA weights; keys and shapes must match exactly."""
    params = {_to_peft_key(name): p for name, p in part.named_parameters() if _is_adapter(name)}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(
            f"adapter does not fit the {type(part).__name__.lower()}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise AdapterError(
                    f"adapter tensor {key}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
                )
            param.copy_(value)


def save_adapter(part: SplitPart, directory: Path, *, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one part."""
    from safetensors.torch import save_file

    settings, names = _lora_of(part)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _peft_config(part, settings, names, base_model).save_pretrained(str(directory))
    save_file(adapter_state_dict(part), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: (config as a dict, tensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise AdapterError(f"{directory}: no {name}; expected a PEFT adapter directory")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return config, load_file(str(directory / ADAPTER_WEIGHTS))


def load_adapter(part: SplitPart, directory: Path) -> None:
    """Load a part adapter saved by :func:`save_adapter` into a part that has LoRA injected."""
    _, tensors = read_adapter(directory)
    load_adapter_state_dict(part, tensors)


def merge_adapters(parts: Sequence[SplitPart], directory: Path, *, base_model: str | None = None) -> Path:
    """One PEFT adapter for the unsplit model from the adapters of all parts.

    Parts may differ in rank and alpha: those are written as PEFT ``rank_pattern``/``alpha_pattern``.
    """
    from safetensors.torch import save_file

    first, _ = _lora_of(parts[0])
    names: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    for part in parts:
        settings, part_names = _lora_of(part)
        names += part_names
        for name in part_names:
            if settings.r != first.r:
                rank_pattern[re.escape(name)] = settings.r
            if settings.alpha != first.alpha:
                alpha_pattern[re.escape(name)] = settings.alpha
        tensors.update(adapter_state_dict(part))
    config = _peft_config(parts[0], first, names, base_model)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def add_part_adapters(parts: Sequence[SplitPart], settings: Sequence[LoraSettings], *, seed: int = 0) -> None:
    """LoRA on head, trunk and tail with their own settings; part ``i`` is initialized with ``seed + i``.

    Because the blocks are shared with the unsplit model, that model now carries the same
    adapters: this is also how the centralized baseline gets an identical starting point.
    """
    if len(parts) != len(settings):
        raise ValueError(f"expected one LoraSettings per part ({len(parts)}), got {len(settings)}")
    for index, (part, part_settings) in enumerate(zip(parts, settings, strict=False)):
        add_lora(part, part_settings, seed=seed + index)
