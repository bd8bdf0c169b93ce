"""P-tuning v2 over the network (FL-GLM, arXiv 2406.14898, Sec. 3): the parts each party builds and
what the server saves at the end (docs/ptuning.md).

``fedsplit server`` builds the trunk with its prefixes (they train there, in the trunk server's
optimizer, and never leave it) plus the global head/tail prefixes it averages; ``fedsplit client``
builds its head and tail with their prefixes. Every part's prefixes are initialized from the run seed
(part ``i``: ``seed + i``), so the server's global head/tail prefixes and every client's start equal.
The FedAvg payload (``client_adapters(head, tail)``) carries the head/tail prefixes like LoRA weights.

``server.mode = "hierarchical"``: the root's trunk built here is the averaging target; every sub-server
builds the same seeded trunk prefixes (:func:`fedsplit.recipes.subserver.build_replica_trunk`, told by
the spec's ``method``), trains them, and the replicas' averaging covers them and their AdamW moments like
LoRA weights (they are the trunk's adapter tensors); the root saves the averaged ones with the head/tail.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedsplit.split import SplitParts

log = logging.getLogger(__name__)

SMALL_PREFIX_LR = 1e-3


def warn_small_prefix_lr(cfg: Any) -> None:
    """Log a warning when a prefix run keeps a LoRA-sized ``train.lr``: the prefixes then barely move (the
    stdlib-docs demo, SmolLM2, P = 16: held-out loss 4.2583 zero-shot, 4.2570 after training at 2e-4,
    3.0087 at 1e-2; docs/ptuning.md)."""
    if cfg.method.name == "prefix" and cfg.train.lr < SMALL_PREFIX_LR:
        log.warning("method.name = 'prefix' with train.lr = %g: P-tuning v2 prefixes need a larger step than "
                    "LoRA weights (docs/ptuning.md measures 1e-2); at this rate they barely move", cfg.train.lr)


def build_prefix_parts(cfg: Any, role: str) -> tuple[object, SplitParts]:
    """(tokenizer, parts) of ``role`` (``"client"``: head + tail; ``"server"``: trunk, with the global
    head/tail prefixes on parts whose weights it does not read) with ``cfg.method.num_virtual_tokens``
    prefixes on every block of the parts that role trains or aggregates."""
    from fedsplit.models.partial import PARTS, ROLE_ADAPTERS, ROLES, load_parts
    from fedsplit.split.prefix import add_prefix

    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if role == "server":
        warn_small_prefix_lr(cfg)
    tokenizer, parts = load_parts(cfg.model.name, cfg.model.head_layers, cfg.model.tail_layers, hold=ROLES[role])
    for index, name in enumerate(PARTS):
        if name in ROLE_ADAPTERS[role]:
            add_prefix(getattr(parts, name), cfg.method.num_virtual_tokens, seed=cfg.train.seed + index,
                       init_std=cfg.method.init_std)
    return tokenizer, parts


def save_final_prefix(parts: SplitParts, out: Path, base_model: str) -> Path:
    """The run's one PEFT prefix-tuning adapter (all three parts' prefixes) under ``out/prefix``: what
    ``peft.PeftModel.from_pretrained(model, out / "prefix")`` loads on the unsplit model."""
    from fedsplit.split.prefix import save_prefix_adapter

    return save_prefix_adapter(list(parts), out / "prefix", base_model=base_model)


def build_full_prefix_parts(cfg: Any) -> tuple[object, SplitParts]:
    """(tokenizer, parts) of the whole model with ``cfg.method.num_virtual_tokens`` prefixes on every part
    (part ``i`` seeded ``train.seed + i``, as both roles start): split generation (``fedsplit generate``
    client / serve), which then loads the run's trained prefixes (``adapters/prefix``)."""
    from fedsplit.models import load_model
    from fedsplit.split import split_model
    from fedsplit.split.prefix import add_part_prefixes

    model, tokenizer = load_model(cfg.model.name)
    parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
    add_part_prefixes(parts, cfg.method.num_virtual_tokens, seed=cfg.train.seed, init_std=cfg.method.init_std)
    return tokenizer, parts
