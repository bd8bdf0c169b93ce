"""``fedsplit export`` of a P-tuning v2 run (FL-GLM, arXiv 2406.14898; docs/ptuning.md).

A prefix run's server saves one PEFT prefix-tuning adapter of all three parts (``adapters/prefix``,
:func:`fedsplit.split.prefix.save_prefix_adapter`). Prefixes are extra keys/values every block attends
to, not a weight delta: there is no merged model. ``--adapter-only`` writes the adapter with a
``base_model_name_or_path`` transformers can load (plus the tokenizer), which
``AutoPeftModelForCausalLM.from_pretrained(out)`` / ``PeftModel.from_pretrained(base, out)`` use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

PREFIX_SUBDIR = "prefix"  # under a run's adapters/ (fedsplit.recipes.prefix_network.save_final_prefix)
_WEIGHTS = "adapter_model.safetensors"


def find_prefix_adapter(run_dir: Path, locations: tuple[str, ...]) -> Path | None:
    """The PEFT prefix-tuning adapter of a prefix run (``<location>/prefix``), or None for a LoRA run."""
    from fedsplit.adapters import ADAPTER_CONFIG

    for rel in ("", *locations):
        candidate = Path(run_dir) / rel / PREFIX_SUBDIR
        config = candidate / ADAPTER_CONFIG
        if config.is_file() and json.loads(config.read_text()).get("peft_type") == "PREFIX_TUNING":
            return candidate
    return None


def export_prefix(job: Any, adapter: Path) -> Path:
    """``job`` (an :class:`fedsplit.recipes.export.ExportJob`): copy the prefix adapter to ``job.out`` with a
    loadable base model; without ``adapter_only``, refuse (a prefix cannot be merged into the weights)."""
    from fedsplit.adapters import ADAPTER_CONFIG
    from fedsplit.models import load_model
    from fedsplit.recipes.export import ExportError, loadable_base

    if not job.adapter_only:
        raise ExportError(f"{adapter}: this run trained P-tuning v2 prefixes, which cannot be merged into the "
                          "model's weights (they are extra keys/values every block attends to); pass --adapter-only "
                          "to export the PEFT prefix-tuning adapter (load it with PeftModel.from_pretrained)")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = job.model or config.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{adapter}: the adapter names no base model; pass --model")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    config["base_model_name_or_path"] = loadable_base(base, out)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(adapter / _WEIGHTS, out / _WEIGHTS)
    load_model(base)[1].save_pretrained(out)
    return out
