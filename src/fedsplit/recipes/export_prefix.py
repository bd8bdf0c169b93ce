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
from collections.abc import Callable
from pathlib import Path

_WEIGHTS = "adapter_model.safetensors"


def find_prefix_adapter(run_dir: Path) -> Path | None:
    """The PEFT prefix-tuning adapter of a P-tuning v2 run: the directory itself, or the first of the run
    layouts that holds one (:data:`fedsplit.recipes.eval_task.ADAPTER_LOCATIONS`); None for a LoRA run."""
    from fedsplit.adapters import ADAPTER_CONFIG
    from fedsplit.recipes.eval_task import ADAPTER_LOCATIONS

    for rel in ("", *ADAPTER_LOCATIONS):
        config = Path(run_dir) / rel / ADAPTER_CONFIG
        if config.is_file() and json.loads(config.read_text()).get("peft_type") == "PREFIX_TUNING":
            return config.parent
    return None


def merge_refusal(adapter: Path) -> str:
    """Why a prefix run has no merged model, and what to pass instead."""
    return (f"{adapter}: this run trained P-tuning v2 prefixes, which cannot be merged into the model's weights "
            "(they are extra keys/values every block attends to); pass --adapter-only to export the PEFT "
            "prefix-tuning adapter (load it with PeftModel.from_pretrained)")


def export_prefix(adapter: Path, out: Path, base: str, loadable_base: Callable[[str, Path], str]) -> Path:
    """Copy the prefix adapter to ``out`` with ``base_model_name_or_path = loadable_base(base, out)`` (a
    directory or hub id transformers loads) and ``base``'s tokenizer."""
    from fedsplit.adapters import ADAPTER_CONFIG
    from fedsplit.models import load_model

    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    out.mkdir(parents=True, exist_ok=True)
    config["base_model_name_or_path"] = loadable_base(base, out)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(adapter / _WEIGHTS, out / _WEIGHTS)
    load_model(base)[1].save_pretrained(out)
    return out
