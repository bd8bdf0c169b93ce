"""``fedsplit export``: a run's three part adapters as one model plain transformers can use.

FL-GLM (arXiv 2406.14898) trains one LoRA adapter per part: the server holds the trunk's, every
client the head's and tail's (after FedAvg all clients hold the same pair, and so does the server
in plain aggregation). An export needs the server's trunk adapter and one client's head and tail:

    base model + head/ + trunk/ + tail/  --merge_adapters-->  one PEFT adapter (unsplit key names)
        --adapter-only: that adapter, with base_model_name_or_path a directory transformers loads
        default:        PeftModel(base, adapter).merge_and_unload() -> save_pretrained (safetensors,
                        config.json, generation_config.json, tokenizer files)

Nothing in the output needs fedsplit: ``AutoModelForCausalLM.from_pretrained(out)``,
``pipeline("text-generation", model=out)`` or ``AutoPeftModelForCausalLM.from_pretrained(out)``.
Reads top to bottom: find the parts -> rebuild the trained parts -> merge -> write.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedsplit.adapters import ADAPTER_CONFIG, add_lora, load_adapter, merge_adapters
from fedsplit.split import SplitParts, num_blocks, split_model
from fedsplit.train.config import LoraSettings

PARTS = ("head", "trunk", "tail")
# Where runs keep their per-part adapters, relative to the run directory (see recipes.eval_task).
PART_LOCATIONS = ("adapters", "server/adapters", "federated/server/adapters")
BASE_SUBDIR = "base"  # --adapter-only of a fedsplit model name: the base model is written here


class ExportError(ValueError):
    """The adapters cannot be exported (missing, inconsistent, or not for this base model)."""


@dataclass
class ExportJob:
    out: Path
    run: Path | None = None  # a run directory holding adapters/{head,trunk,tail}
    head: Path | None = None  # or the three adapter directories one by one
    trunk: Path | None = None
    tail: Path | None = None
    model: str | None = None  # base model; default: the adapters' base_model_name_or_path
    adapter_only: bool = False


def find_part_adapters(run_dir: Path) -> dict[str, Path]:
    """``{"head": dir, "trunk": dir, "tail": dir}`` of a server or simulate run directory."""
    run_dir = Path(run_dir)
    for rel in ("", *PART_LOCATIONS):
        base = run_dir / rel
        found = {part: base / part for part in PARTS}
        if all((path / ADAPTER_CONFIG).is_file() for path in found.values()):
            return found
    raise ExportError(
        f"{run_dir}: no head/, trunk/ and tail/ adapters under any of {', '.join(PART_LOCATIONS)}; "
        "pass --head, --trunk and --tail (the server's trunk adapter and one client's head and tail)"
    )


def _module_names(config: dict, where: Path) -> list[str]:
    """The exact module names of a part adapter (saved as a full-match regex of escaped names)."""
    targets = config.get("target_modules")
    if not isinstance(targets, str):
        raise ExportError(f"{where}: expected target_modules to be the regex fedsplit writes, got {targets!r}")
    return [re.sub(r"\\(.)", r"\1", name) for name in targets.split("|")]


def part_settings(adapter_dir: Path) -> tuple[LoraSettings, list[str]]:
    """The LoRA settings a part adapter was trained with, and the modules it adapts."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    names = _module_names(config, adapter_dir)
    suffixes = tuple(sorted({name.rsplit(".", 1)[-1] for name in names}))
    settings = LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout") or 0.0), target_modules=suffixes)
    return settings, names


def _layers_of(names: list[str]) -> list[int]:
    return sorted({int(match.group(1)) for name in names if (match := re.search(r"\.(\d+)\.", name))})


def infer_cut(head_names: list[str], tail_names: list[str], num_layers: int) -> tuple[int, int]:
    """(head_layers, tail_layers) from the block indices the head and tail adapters touch."""
    head, tail = _layers_of(head_names), _layers_of(tail_names)
    if not head or not tail:
        raise ExportError("the head or tail adapter names no decoder block; cannot tell where the cut is")
    head_layers, tail_layers = head[-1] + 1, num_layers - tail[0]
    if head != list(range(head_layers)) or tail != list(range(tail[0], num_layers)):
        raise ExportError(f"expected the head to adapt blocks 0..p-1 and the tail blocks N-q..N-1 of {num_layers}, "
                          f"got head {head} and tail {tail}; is this the right base model?")
    return head_layers, tail_layers


def base_model_name(dirs: dict[str, Path], model: str | None) -> str:
    """``model`` if given, else the base model every part adapter names (they must agree)."""
    if model:
        return model
    names = {json.loads((d / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") for d in dirs.values()}
    names.discard(None)
    if len(names) != 1:
        raise ExportError(f"the part adapters name {sorted(names) or 'no'} base model(s); pass --model")
    return names.pop()


def load_trained_parts(dirs: dict[str, Path], base: str):
    """(model, tokenizer, parts): ``base`` cut where the adapters say, each part with its trained adapter."""
    from fedsplit.models import load_model

    model, tokenizer = load_model(base)
    settings = {part: part_settings(dirs[part]) for part in PARTS}
    head_layers, tail_layers = infer_cut(settings["head"][1], settings["tail"][1], num_blocks(model))
    parts = split_model(model, head_layers, tail_layers)
    for part_name, part in zip(PARTS, parts, strict=True):
        names = add_lora(part, settings[part_name][0])
        if names != settings[part_name][1]:
            raise ExportError(f"{dirs[part_name]}: adapts {len(settings[part_name][1])} modules, but the "
                              f"{part_name} of {base} has {len(names)} matching ones; is this the right base model?")
        load_adapter(part, dirs[part_name])
    return model, tokenizer, parts


def loadable_base(base: str, out: Path) -> str:
    """A ``base_model_name_or_path`` transformers can load: an existing directory (absolute), a hub id,
    or, for a fedsplit model name (``smollm2-135m``, ``tiny-llama``, ...), the base model written to
    ``out/base``. Never the fedsplit alias: transformers would look for it on the hub."""
    from fedsplit.models import load_model
    from fedsplit.models.loading import NAMED_MODELS

    if base in NAMED_MODELS:
        target = out / BASE_SUBDIR
        model, tokenizer = load_model(base)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return str(target.resolve())
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else base


def write_merged_model(parts: SplitParts, base: str, tokenizer, out: Path) -> Path:
    """The LoRA merged into the base weights, saved as a standard Hugging Face model directory."""
    from peft import PeftModel

    from fedsplit.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        merge_adapters(list(parts), Path(tmp))
        fresh, _ = load_model(base)
        merged = PeftModel.from_pretrained(fresh, tmp).merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id
    if merged.generation_config is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_export(job: ExportJob) -> Path:
    explicit = {part: getattr(job, part) for part in PARTS}
    if any(explicit.values()):
        if not all(explicit.values()) or job.run is not None:
            raise ExportError("export: pass either --run or all three of --head, --trunk and --tail")
        dirs = {part: Path(path) for part, path in explicit.items() if path is not None}
    elif job.run is not None:
        from fedsplit.recipes.export_prefix import export_prefix, find_prefix_adapter, merge_refusal

        prefix = find_prefix_adapter(job.run)  # a P-tuning v2 run: one PEFT prefix adapter
        if prefix is not None:
            if not job.adapter_only:
                raise ExportError(merge_refusal(prefix))
            return export_prefix(prefix, Path(job.out), base_model_name({"prefix": prefix}, job.model), loadable_base)
        dirs = find_part_adapters(job.run)
    else:
        raise ExportError("export: expected --run DIR or --head/--trunk/--tail adapter directories")
    base = base_model_name(dirs, job.model)
    _, tokenizer, parts = load_trained_parts(dirs, base)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if job.adapter_only:
        merge_adapters(list(parts), out, base_model=loadable_base(base, out))
        tokenizer.save_pretrained(out)
    else:
        write_merged_model(parts, base, tokenizer, out)
    return out
