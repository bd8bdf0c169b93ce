"""The test suite's one home for tiny split models, token batches and rows (importable as ``tiny``).

``pyproject.toml`` puts ``tests/`` on the path, so any test module can ``from tiny import ...``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsplit.adapters import LoraSettings, add_part_adapters
from fedsplit.split import SplitParts, split_model

LORA = [LoraSettings(r=2), LoraSettings(r=2), LoraSettings(r=2)]

# Seven hand-written CommitmentBank-shaped rows (all three labels) for evaluation tests.
CB_ROWS = [
    {"premise": "The cat sat on the mat.", "hypothesis": "A cat sat.", "label": "entailment"},
    {"premise": "It rained all day.", "hypothesis": "It was sunny.", "label": "contradiction"},
    {"premise": "She may come later.", "hypothesis": "She will come.", "label": "neutral"},
    {"premise": "Dogs bark.", "hypothesis": "Dogs make sounds.", "label": "entailment"},
    {"premise": "The shop is closed.", "hypothesis": "The shop is open.", "label": "contradiction"},
    {"premise": "He might win.", "hypothesis": "He wins.", "label": "neutral"},
    {"premise": "Water is wet.", "hypothesis": "Water is dry.", "label": "contradiction"},
]


def build_model(seed: int = 0) -> tuple[torch.nn.Module, SplitParts]:
    """A fresh tiny Llama cut 1 | 4 | 1 with LoRA on every part; same seed, same weights.

    The parts share their modules with the returned unsplit model.
    """
    from fedsplit.models import load_model

    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_adapters(parts, LORA, seed=seed)
    return model, parts


def randomize_adapters(parts, std: float) -> None:
    """Every adapter weight of ``parts`` drawn from N(0, std) (global torch RNG): PEFT starts LoRA's B
    at zero, so without this the adapters would change nothing a test could see."""
    from fedsplit.adapters import trainable_parameters

    with torch.no_grad():
        for part in parts:
            for param in trainable_parameters(part):
                param.normal_(0, std)


def token_batches(count: int, batch_size: int, seed: int, length: int = 12) -> list[dict[str, Tensor]]:
    """``count`` random batches of tiny-llama tokens, the last 3 positions of row 0 right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 250, (batch_size, length), generator=g)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[0, length - 3 :] = 0  # some right padding
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def token_batch(vocab: int, batch: int = 8, length: int = 32, seed: int = 0, pad_last: int = 0) -> dict[str, Tensor]:
    """Random tokens (B, T) of a chat-like example: the first half is prompt (no loss), the last
    ``pad_last`` positions of row 0 are padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[0, -pad_last:] = 0
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the "prompt" carries no loss
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_federation_in_threads(cfg, config_dir, out, clients: int = 2) -> tuple[int, list[BaseException]]:
    """``fedsplit server`` in this thread with ``clients`` ``fedsplit client`` threads (``client-i``, silo ``i``):
    (the server's exit code, the clients' exceptions). Restores the signal handlers ``run_server`` sets."""
    import signal
    import threading
    from dataclasses import replace

    from fedsplit.recipes import network

    errors: list[BaseException] = []

    def client(index: int) -> None:
        mine = replace(cfg, client=replace(cfg.client, id=f"client-{index}", silo=index))
        try:
            network.run_client(mine, config_dir, out / f"client-{index}")
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for thread in threads:
            thread.start()
        code = network.run_server(cfg, config_dir, out / "server")
        for thread in threads:
            thread.join(60.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, errors


def split_logits_fn(parts):
    """head -> trunk -> tail of ``parts`` in this process as a ``fedsplit.eval.scoring.LogitsFn``: the logits
    ``(B, T, V)``, or of the last ``keep`` positions."""
    from fedsplit.split.parts import positions_from_mask

    def logits(batch, keep=None):
        mask = batch["attention_mask"]
        positions = positions_from_mask(mask)
        out = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions), mask,
                         positions)  # (B, T, V)
        return out[:, -keep:] if keep else out

    return logits
