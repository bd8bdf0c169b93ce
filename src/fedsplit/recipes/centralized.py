"""``fedsplit centralized``: LoRA fine-tuning of the unsplit model on the pooled client data.

The yardstick for every federated result: same data pipeline, loss, optimizer, schedule, LoRA
placement and initialization (adapters are injected through the same split views), and the
same number of optimizer steps as the federated run makes in total.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fedsplit.adapters import add_part_adapters, merge_adapters, trainable_parameters
from fedsplit.config import RunConfig
from fedsplit.metrics import MetricsWriter
from fedsplit.models import load_model
from fedsplit.recipes.common import BatchStream, FederatedData, encode
from fedsplit.recipes.evaluate import EvalResult, evaluate
from fedsplit.split import split_model
from fedsplit.train.centralized import CentralizedTrainer
from fedsplit.train.optim import schedule_horizon


@dataclass
class CentralizedResult:
    losses: list[tuple[int, float]]  # (optimizer step, training loss)
    eval: EvalResult
    adapter_dir: Path


def total_federated_steps(cfg: RunConfig) -> int:
    return schedule_horizon(cfg.federation.rounds, cfg.federation.local_steps, cfg.data.num_clients)


def run_centralized(cfg: RunConfig, data: FederatedData, out: Path, metrics: MetricsWriter) -> CentralizedResult:
    model, tokenizer = load_model(cfg.model.name)
    parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
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
    adapter_dir = merge_adapters(list(parts), Path(out) / "adapters" / "centralized", base_model=cfg.model.name)
    evaluation = evaluate(model, tokenizer, data.eval, cfg)
    metrics.write("eval", mode="centralized", loss=evaluation.loss, rouge_l=evaluation.rouge_l)
    return CentralizedResult(losses, evaluation, adapter_dir)
