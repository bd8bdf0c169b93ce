"""``fedsplit centralized``: LoRA or P-tuning v2 fine-tuning of the unsplit model on the pooled client data.

The yardstick for every federated result: same data pipeline, loss, optimizer, schedule, LoRA
placement and initialization (adapters are injected through the same split views), and the
same number of optimizer steps as the federated run makes in total.

With ``[method] name = "prefix"`` (FL-GLM's P-tuning v2, arXiv 2406.14898; docs/ptuning.md) the model is
PEFT's prefix-tuning model, whose one ``prompt_embeddings`` table starts as the federation's parts start
(part ``i``'s prefixes seeded ``train.seed + i``) and is the only trainable parameter; the result is
saved as the federation saves its ``adapters/prefix``: one PEFT prefix-tuning adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fedsplit.adapters import add_part_adapters, merge_adapters, trainable_parameters
from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter
from fedsplit.models import load_model
from fedsplit.recipes.common import BatchStream, FederatedData, encode
from fedsplit.recipes.evaluate import EvalResult, evaluate
from fedsplit.split import SplitParts, split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.optim import schedule_horizon


@dataclass
class CentralizedResult:
    losses: list[tuple[int, float]]  # (optimizer step, training loss)
    eval: EvalResult
    adapter_dir: Path


def total_federated_steps(cfg: RunConfig) -> int:
    return schedule_horizon(cfg.federation.rounds, cfg.federation.local_steps, cfg.data.num_clients)


def prefix_model(model: nn.Module, parts: SplitParts, num_virtual_tokens: int, *,
                 seed: int, init_std: float) -> tuple[nn.Module, nn.Parameter]:
    """(PEFT prefix-tuning model of ``model``, its ``prompt_embeddings`` table) starting from the prefixes a
    federation's parts start from (:func:`~fedsplit.split.prefix.add_part_prefixes` with ``seed``, also
    left on ``parts``). The table is the only trainable parameter."""
    import warnings

    from peft import get_peft_model

    from fedsplit.split.prefix import add_part_prefixes, peft_prefix_config, peft_prefix_table

    add_part_prefixes(parts, num_virtual_tokens, seed=seed, init_std=init_std)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on the base model's config
        peft_model = get_peft_model(model, peft_prefix_config(num_virtual_tokens))
    table = peft_model.prompt_encoder["default"].embedding.weight  # (P, num_layers * 2 * kv_heads * head_dim)
    with torch.no_grad():
        table.copy_(peft_prefix_table(parts))
    return peft_model, table


def run_centralized(cfg: RunConfig, data: FederatedData, out: Path, metrics: MetricsWriter) -> CentralizedResult:
    base, tokenizer = load_model(cfg.model.name)
    parts = split_model(base, cfg.model.head_layers, cfg.model.tail_layers)
    model: nn.Module = base
    table = None
    if cfg.method.name == "prefix":
        from fedsplit.recipes.prefix_network import warn_small_prefix_lr

        warn_small_prefix_lr(cfg)
        model, table = prefix_model(base, parts, cfg.method.num_virtual_tokens, seed=cfg.train.seed,
                                    init_std=cfg.method.init_std)
        params = [table]
    else:
        add_part_adapters(parts, cfg.lora, seed=cfg.train.seed)
        params = [p for part in parts for p in trainable_parameters(part)]
    steps = total_federated_steps(cfg)
    trainer = CentralizedTrainer(model, params, cfg.train, total_steps=steps)
    stream = BatchStream(encode(data.pooled, tokenizer, cfg), cfg.train.batch_size, tokenizer.pad_token_id,
                         cfg.train.padding_side, cfg.train.seed)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="centralized", unit="step"):
        result = trainer.train_step(stream.take(cfg.train.grad_accum))
        losses.append((step + 1, result.loss))
        metrics.write(
            "train_step", mode="centralized", step=step + 1, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm
        )
    where = Path(out) / "adapters" / "centralized"
    if table is not None:  # the trained table back on the parts, saved as the federation saves its prefixes
        from fedsplit.split.prefix import load_peft_prefix_table, save_prefix_adapter

        load_peft_prefix_table(parts, table.detach())
        adapter_dir = save_prefix_adapter(list(parts), where, base_model=cfg.model.name)
    else:
        adapter_dir = merge_adapters(list(parts), where, base_model=cfg.model.name)
    evaluation = evaluate(model, tokenizer, data.eval, cfg)
    metrics.write("eval", mode="centralized", loss=evaluation.loss, rouge_l=evaluation.rouge_l)
    return CentralizedResult(losses, evaluation, adapter_dir)
