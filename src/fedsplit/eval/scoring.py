"""What evaluation needs from a language model: log-likelihoods of given tokens, and greedy answers.

A model is reached through a :class:`ModelAccess`: a ``logits`` function ``batch -> (B, T, V)`` and
a ``generate`` function. For the unsplit model (zero-shot, merged adapters, centralized) that is
:func:`unsplit_access` (Hugging Face ``generate`` with its KV cache). In FL-GLM (arXiv 2406.14898)
a client can evaluate *through the split* without any example leaving it: its logits are head ->
server trunk -> tail, and :func:`greedy_decode` generates with any logits function (no cache, so
one full forward per new token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsplit.data.tokenize import IGNORE_INDEX, EncodedExample, collate
from fedsplit.eval.prefix_generation import generate as generate_tokens  # a PEFT prefix model: prefixes cached
from fedsplit.split.parts import positions_from_mask

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask (, labels): each (B, T)
# (batch, keep) -> (B, T, V), or only the last ``keep`` positions (B, keep, V) when keep is given
LogitsFn = Callable[[Batch, "int | None"], torch.Tensor]
GenerateFn = Callable[[Sequence[Sequence[int]], int], list[list[int]]]  # (prompt ids, max new tokens) -> new ids
# (batch with labels, keep) -> (B, keep - 1): log p of each of the last keep - 1 tokens given what precedes it
# (0 where the label is IGNORE_INDEX)
TargetLogprobsFn = Callable[[Batch, int], torch.Tensor]


@dataclass(frozen=True)
class ModelAccess:
    """How evaluation reaches a model: logits of padded batches, and greedy continuations."""

    logits: LogitsFn
    generate: GenerateFn
    pad_token_id: int
    # scoring without the batch's (B, keep, V) logits (a split client's LM head, row by row); else from ``logits``
    target_logprobs: TargetLogprobsFn | None = None


def _batches(items: Sequence, size: int, desc: str, progress: bool) -> Iterable[Sequence]:
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        yield items[start : start + size]


def _first_scored(sequence: EncodedExample) -> int:
    return next((i for i, label in enumerate(sequence.labels) if label != IGNORE_INDEX), len(sequence.labels))


@torch.no_grad()
def sequence_logprobs(
    access: ModelAccess, sequences: Sequence[EncodedExample], *, batch_size: int = 8, desc: str = "scoring",
    progress: bool = True,
) -> list[tuple[float, int]]:
    """Per sequence: (sum of log p(token | everything before it), number of tokens) over its labelled tokens.

    Labels follow the training convention (``IGNORE_INDEX`` = not scored). Sequences are batched by
    length and left-padded, so the scored tokens (a response, an answer) sit in the last positions
    and the LM head runs only there; padding never changes a score (positions come from the mask).
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
    results: dict[int, tuple[float, int]] = {}
    for chunk in _batches(order, batch_size, desc, progress):
        rows = [sequences[i] for i in chunk]
        batch = collate(rows, access.pad_token_id, "left")
        keep = max(len(r.labels) - _first_scored(r) for r in rows) + 1  # the positions predicting scored tokens
        keep = min(keep, batch["input_ids"].shape[1])
        logp = (access.target_logprobs or logits_target_logprobs(access.logits))(batch, keep)  # (B, keep-1)
        scored = last_labels(batch["labels"], logp.shape[1]) != IGNORE_INDEX  # (B, keep-1)
        for row, index in enumerate(chunk):
            results[index] = (float(logp[row][scored[row]].double().sum()), int(scored[row].sum()))
    return [results[i] for i in range(len(sequences))]


def last_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` labels of each row ``(B, n)`` (none for ``n = 0``): the tokens the last ``n`` scored
    positions predict."""
    return labels[:, labels.shape[1] - n:]


def row_target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[i, targets[i]]`` for one row's positions ``(n, V)`` -> ``(n,)``; 0 where ignored."""
    scored = targets != IGNORE_INDEX
    logp = torch.zeros(targets.shape, dtype=torch.float32)
    picked = logits[scored].float()  # (m, V): only the scored positions
    logp[scored] = torch.log_softmax(picked, dim=-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    return logp


def logits_target_logprobs(logits_fn: LogitsFn) -> TargetLogprobsFn:
    """:data:`TargetLogprobsFn` from the logits of the last ``keep`` positions, log-softmaxed one row at a time
    (the copies are ``(n, V)``, not ``(B, n, V)``)."""

    def logprobs(batch: Batch, keep: int) -> torch.Tensor:
        logits = logits_fn(batch, keep)[:, -keep:-1, :]  # (B, keep-1, V): predicts the last keep-1 tokens
        targets = last_labels(batch["labels"], logits.shape[1])  # (B, keep-1)
        return torch.stack([row_target_logprobs(logits[row], targets[row]) for row in range(targets.shape[0])])

    return logprobs


def unsplit_logits(model: torch.nn.Module) -> LogitsFn:
    def logits(batch: Batch, keep: int | None = None) -> torch.Tensor:
        mask = batch["attention_mask"]
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask),
                     logits_to_keep=keep or 0).logits  # (B, keep or T, V)

    return logits


def unsplit_access(model: Any, tokenizer) -> ModelAccess:
    """:class:`ModelAccess` for an unsplit (or PEFT-wrapped) Hugging Face causal LM."""
    stop = _stop_ids(tokenizer)

    @torch.no_grad()
    def generate(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
        out = generate_tokens(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)  # (B, T + new)
        return [_until_stop(row[width:].tolist(), stop) for row in out]

    return ModelAccess(unsplit_logits(model), generate, tokenizer.pad_token_id)


def _stop_ids(tokenizer) -> list[int]:
    """EOS and, for chat templates, the end-of-turn token the training responses end with."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if token_id is not None:
            ids.add(token_id)
    return sorted(ids)


def _until_stop(ids: list[int], stop: Sequence[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in stop:
            return ids[:index]
    return ids


@torch.no_grad()
def greedy_decode(
    logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_token_id: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy continuation of each prompt with any logits function (one full forward per token).

    Right padding and positions from the mask, as in training: the same answers as a cached
    ``generate`` up to floating-point ties.
    """
    rows = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        seqs = [EncodedExample(rows[i], [IGNORE_INDEX] * len(rows[i])) for i in live]
        batch = collate(seqs, pad_token_id, "right")
        logits = logits_fn(batch, None)  # (B, T, V)
        last = torch.tensor([len(rows[i]) - 1 for i in live])  # (B,)
        picked = logits[torch.arange(len(live)), last].argmax(dim=-1)  # (B,)
        for i, token in zip(live, picked.tolist(), strict=True):
            if token in stop_ids:
                done[i] = True
            else:
                rows[i].append(token)
                new[i].append(token)
    return new


def function_access(logits_fn: LogitsFn, tokenizer, target_logprobs: TargetLogprobsFn | None = None) -> ModelAccess:
    """:class:`ModelAccess` from a bare :data:`LogitsFn`, e.g. a split client's head -> trunk -> tail
    (``SplitClient._eval_logits``, and ``SplitClient.eval_target_logprobs`` to score without the
    batch's logits): no example leaves the client."""
    stop = _stop_ids(tokenizer)

    def generate(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_decode(logits_fn, prompts, max_new_tokens, pad_token_id=tokenizer.pad_token_id, stop_ids=stop)

    return ModelAccess(logits_fn, generate, tokenizer.pad_token_id, target_logprobs)
