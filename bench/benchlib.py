"""What the step benchmarks share: their command line, their random batches, their summaries.

Run a benchmark as ``python bench/NAME.py``: its own folder is then first on ``sys.path``, so
``from benchlib import ...`` resolves here (and the tests put ``bench/`` on the path too).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def step_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a benchmark that times LoRA steps of a model at ``batch x seq`` tokens."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser


def random_batch(generator: torch.Generator, vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Uniform random tokens, no padding, the loss on every position."""
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
