"""Token positions for the attacks: the attacker's PUBLIC text and a client's PRIVATE batches.

Public text is what an honest-but-curious server can read anywhere (the shared tinyshakespeare,
TinyStories and Alpaca files); Alpaca is rendered with the model's chat template, as the clients'
data is, so the template's tokens are covered too. Private batches are a client's own examples,
tokenized exactly as training tokenizes them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fedsplit.attacks.hidden import hidden_by_depth
from fedsplit.data import Example, SourceConfig, collate, encode_examples, load_examples
from fedsplit.data.errors import DataUnavailableError

Batch = dict[str, torch.Tensor]


def _windows(ids: Sequence[int], seq_len: int) -> Iterator[list[int]]:
    for start in range(0, len(ids) - 1, seq_len):
        window = list(ids[start : start + seq_len])
        if len(window) >= 2:
            yield window


def public_sequences(
    tokenizer, shared_data: Path, max_positions: int, seq_len: int = 64, seed: int = 0
) -> list[list[int]]:
    """Token windows of public text, interleaved across sources, ``max_positions`` tokens in all."""
    shared_data = Path(shared_data)
    wanted = {"tinyshakespeare/input.txt", "tinystories/validation_100.txt", "alpaca/alpaca_data_first5000.json"}
    missing = sorted(name for name in wanted if not (shared_data / name).is_file())
    if missing:
        raise DataUnavailableError(f"public attack corpus: {', '.join(missing)} not found under {shared_data}")
    budget_chars = max_positions * 6  # ~4 characters per token, with margin
    shakespeare = (shared_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")[:budget_chars]
    stories = (shared_data / "tinystories/validation_100.txt").read_text(encoding="utf-8")[:budget_chars]
    alpaca = load_examples(
        SourceConfig(
            path=str(shared_data / "alpaca/alpaca_data_first5000.json"), task="alpaca", on_empty_response="skip"
        )
    )
    random.Random(seed).shuffle(alpaca)
    sources = [
        list(_windows(tokenizer(shakespeare, add_special_tokens=False)["input_ids"], seq_len)),
        [
            w
            for story in stories.split("<|endoftext|>")
            if story.strip()
            for w in _windows(tokenizer(story.strip(), add_special_tokens=False)["input_ids"], seq_len)
        ],
        [e.input_ids for e in encode_examples(alpaca[: max(1, max_positions // 40)], tokenizer, seq_len)],
    ]
    out: list[list[int]] = []
    total = 0
    for round_robin in itertools.zip_longest(*sources):
        for window in filter(None, round_robin):
            if total >= max_positions:
                return out
            out.append(window)
            total += len(window)
    return out


def sequence_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches, each (B, T)."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def private_batches(
    examples: Sequence[Example], tokenizer, max_length: int, batch_size: int, max_positions: int
) -> list[Batch]:
    """A client's examples as training batches (``input_ids``, ``attention_mask``, ``labels``).

    Examples are taken in order until ``max_positions`` tokens are reached.
    """
    encoded, total = [], 0
    for example in encode_examples(examples, tokenizer, max_length):
        if total >= max_positions:
            break
        encoded.append(example)
        total += len(example.input_ids)
    if not encoded:
        raise ValueError("private_batches: no private examples")
    return [
        collate(encoded[i : i + batch_size], tokenizer.pad_token_id, "right")
        for i in range(0, len(encoded), batch_size)
    ]


@dataclass
class CutPositions:
    """Hidden states at cut 1 of every real (non-padding) position, per head depth, with their tokens."""

    hidden: dict[int, torch.Tensor]  # p -> (N, H)
    tokens: torch.Tensor  # (N,)
    lengths: list[int]  # real tokens per sequence, in order: splits the N positions back into sequences

    def sequences(self, flat: torch.Tensor) -> list[list[int]]:
        return [chunk.tolist() for chunk in torch.split(flat, self.lengths)]


def collect(
    model: nn.Module, depths: Sequence[int], batches: Sequence[Batch], *, desc: str = "hidden states"
) -> CutPositions:
    """Run the head (every depth in one pass) over ``batches`` and keep the real positions."""
    hidden: dict[int, list[torch.Tensor]] = {p: [] for p in depths}
    tokens, lengths = [], []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask.bool()  # (B, T)
        for p, h in hidden_by_depth(model, depths, ids, mask).items():
            hidden[p].append(h[keep].float())  # (n, H)
        tokens.append(ids[keep])
        lengths += mask.sum(1).tolist()
    return CutPositions({p: torch.cat(h) for p, h in hidden.items()}, torch.cat(tokens), lengths)
