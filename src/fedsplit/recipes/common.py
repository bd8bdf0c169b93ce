"""Pieces every recipe needs: data for each client, batches, evaluation, the run directory."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedsplit.config import DataConfig, RunConfig
from fedsplit.data import Example, SourceConfig, collate, encode_examples, load_examples, stdlib_docs_silos
from fedsplit.data.tokenize import EncodedExample
from fedsplit.eval.prefix_generation import generate as generate_tokens


@dataclass
class FederatedData:
    """Each client's examples (its silo) and the shared held-out evaluation set."""

    silos: list[list[Example]]
    eval: list[Example]

    @property
    def pooled(self) -> list[Example]:
        return [example for silo in self.silos for example in silo]


def load_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Built-in stdlib-docs silos (non-IID by module family) or a task file split round-robin;
    ``cfg.partition`` re-splits the pool instead (iid, Dirichlet label skew, quantity skew)."""
    if cfg.dataset == "stdlib-docs":
        families = 3 if cfg.partition != "default" else cfg.num_clients  # 3 silos: one per family
        split = stdlib_docs_silos(families, cfg.eval_fraction, seed)
        silos, held_out = [list(s) for s in split.silos], list(split.eval)
        if cfg.partition != "default":
            pool = [example for silo in silos for example in silo]
            labels = [family for family, silo in enumerate(silos) for _ in silo]  # label = module family
            silos = _repartition(pool, labels, cfg, seed)
    else:
        train = load_examples(SourceConfig(path=cfg.train_path, task=cfg.task))
        held_out = load_examples(SourceConfig(path=cfg.eval_path, task=cfg.task))
        random.Random(seed).shuffle(train)
        if cfg.max_train_examples:
            train = train[: cfg.max_train_examples]
        if cfg.partition == "default":
            silos = [train[i :: cfg.num_clients] for i in range(cfg.num_clients)]
        else:  # label = the verbalized answer (the label of a classification task)
            silos = _repartition(train, [example.response for example in train], cfg, seed)
    if cfg.max_eval_examples:
        held_out = held_out[: cfg.max_eval_examples]
    return FederatedData(silos, held_out)


def _repartition(
    pool: Sequence[Example], labels: Sequence[str | int], cfg: DataConfig, seed: int
) -> list[list[Example]]:
    from fedsplit.data.partition import partition

    shards = partition(cfg.partition, cfg.num_clients, seed, labels=labels, alpha=cfg.partition_alpha)
    return [[pool[i] for i in shard] for shard in shards]


class BatchStream:
    """Endless, reproducible micro-batches from one client's encoded examples.

    Epoch ``e`` is shuffled with ``seed + e``; ``position`` (batches handed out so far) fully
    determines what comes next, so a resumed run replays exactly the same batches.
    """

    def __init__(
        self, examples: Sequence[EncodedExample], batch_size: int, pad_id: int, padding_side: str, seed: int
    ) -> None:
        if not examples:
            raise ValueError("BatchStream: no training examples")
        self.examples, self.batch_size = list(examples), batch_size
        self.pad_id, self.padding_side, self.seed = pad_id, padding_side, seed
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.examples) // self.batch_size)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next(self) -> dict[str, torch.Tensor]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        order = self._epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        self.position += 1
        return collate([self.examples[i] for i in order], self.pad_id, self.padding_side)

    def take(self, count: int) -> list[dict[str, torch.Tensor]]:
        return [self.next() for _ in range(count)]


def eval_batches(examples: Sequence[EncodedExample], batch_size: int, pad_id: int, padding_side: str) -> list[dict]:
    return [collate(examples[i : i + batch_size], pad_id, padding_side) for i in range(0, len(examples), batch_size)]


def encode(examples: Sequence[Example], tokenizer, cfg: RunConfig) -> list[EncodedExample]:
    return encode_examples(examples, tokenizer, cfg.train.max_length)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_answers(
    model, tokenizer, examples: Sequence[Example], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers of an unsplit (merged-adapter or PEFT prefix) model to each example's prompt."""
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    answers: list[str] = []
    try:
        batches = chunks(examples, batch_size)
        total = -(-len(examples) // batch_size)
        for batch in tqdm(batches, total=total, desc="generating answers", unit="batch", leave=False):
            prompts = [_prompt_text(example, tokenizer) for example in batch]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = generate_tokens(  # model.generate, with a PEFT prefix model's prefixes in its cache
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
    return [a.strip() for a in answers]


def _prompt_text(example: Example, tokenizer) -> str:
    messages = [{"role": m.role, "content": m.content} for m in example.prompt_messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def prepare_run_dir(out: Path, cfg: RunConfig) -> Path:
    from fedsplit.configio import dump_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(dump_config(cfg))
    return out
