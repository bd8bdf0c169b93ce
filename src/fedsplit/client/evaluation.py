"""The client's side of federated evaluation and of the in-run privacy audit (issue 12, items 1 and 4).

Federated evaluation (FL-GLM, arXiv 2406.14898: held-out quality of the federated model). When
the server's RoundPlan says ``evaluate``, the client loads the round's new global head/tail
parts and scores its OWN held-out examples through the split: head -> FORWARD(train = false) ->
server trunk -> tail, with :func:`fedsplit.eval.evaluate_split`'s scoring (classification by
log-likelihood ranking of the verbalized labels; generation by held-out loss, and ROUGE when
``generate``). No example leaves the client: the server sees hidden states, as in training, and
an EVAL_REPORT of aggregate numbers (``n``, ``loss``, ``tokens``, ``accuracy``, ``cm.<g>.<p>``...).

The privacy audit (``[privacy] audit``): after its local steps, before its update leaves, the
client attacks its own traffic of the round with :func:`fedsplit.attacks.audit.audit_batch`:
nearest-neighbour inversion (a) and, given an inverter fitted on public text, the learned
inversion (b) of what its head sent for a sample of the round's batches. Only the scores travel,
as ``audit_*`` entries of the ClientUpdate's metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from google.protobuf.message import Message
from torch import Tensor

from fedsplit.channel import Channel, RemoteError
from fedsplit.client.split_client import SplitClient
from fedsplit.data.schema import Example
from fedsplit.eval.choices import ChoiceExample
from fedsplit.eval.evaluator import EvalSettings, evaluate_classification, evaluate_generation
from fedsplit.eval.scoring import ModelAccess, function_access, sequence_logprobs
from fedsplit.eval.stats import CI_HIGH, CI_LOW
from fedsplit.protocol import pb
from fedsplit.split.parts import Head, Tail
from fedsplit.train.config import TrainConfig

log = logging.getLogger(__name__)

Batch = Mapping[str, Tensor]  # input_ids, attention_mask, labels: each (B, T)
AUDIT_PREFIX = "audit_"  # the server reads these ClientUpdate.metrics (server/evaluation.py)


class PatientChannel:
    """A channel whose calls wait and retry when the server's evaluation rate limit refuses them."""

    def __init__(self, channel: Channel, *, attempts: int = 60, wait_s: float = 0.5) -> None:
        self.channel, self.attempts, self.wait_s = channel, attempts, wait_s

    def call(self, kind: int, message: Message, *, round: int = 0, step: int = 0) -> Any:
        for attempt in range(self.attempts):
            try:
                return self.channel.call(kind, message, round=round, step=step)
            except RemoteError as exc:
                if exc.code != pb.RESOURCE_EXHAUSTED or attempt == self.attempts - 1:
                    raise
                time.sleep(self.wait_s)
        raise AssertionError("unreachable")


def _wire_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """What may leave the client: pooled numbers, no per-example interval (the server recomputes)."""
    return {k: float(v) for k, v in metrics.items() if not k.endswith((CI_LOW, CI_HIGH))}


def local_metrics(
    access: ModelAccess, tokenizer, data: Sequence[Example] | Sequence[ChoiceExample], settings: EvalSettings,
    *, generate: bool = False,
) -> dict[str, float]:
    """Flat metrics of one client's held-out data (see :mod:`fedsplit.eval.evaluator`).

    Classification: accuracy, macro-F1 and the confusion matrix (``generate``: also exact match).
    Generation: held-out loss over ``tokens`` supervised tokens (``generate``: also ROUGE-1/2/L of
    greedy answers, one FORWARD per generated token).
    """
    if not data:
        return {}
    if all(isinstance(item, ChoiceExample) for item in data):
        report = evaluate_classification(access, tokenizer, data, replace(settings, exact_match=generate))  # type: ignore[arg-type]
        return _wire_metrics(report.metrics)
    if generate:
        return _wire_metrics(evaluate_generation(access, tokenizer, data, settings).metrics)  # type: ignore[arg-type]
    from fedsplit.data.tokenize import encode_examples

    encoded = encode_examples(data, tokenizer, settings.max_length)  # type: ignore[arg-type]
    scores = sequence_logprobs(access, encoded, batch_size=settings.batch_size, desc="held-out loss",
                               progress=settings.progress)
    tokens = sum(count for _, count in scores)
    loss = -sum(s for s, _ in scores) / max(1, tokens)
    return {"n": float(len(data)), "loss": loss, "tokens": float(tokens), "perplexity": math.exp(loss)}


@dataclass
class LocalEvaluator:
    """A client's held-out data and how to score it; ``history`` keeps each round's metrics."""

    tokenizer: Any
    data: Sequence[Example] | Sequence[ChoiceExample]
    settings: EvalSettings = field(default_factory=lambda: EvalSettings(progress=False))
    generate: bool = False  # ROUGE / exact match by greedy decoding through the split (slow: no KV cache)
    history: list[dict[str, Any]] = field(default_factory=list)

    @torch.no_grad()
    def evaluate(self, head: Head, tail: Tail, channel: Channel, cfg: TrainConfig, round: int) -> dict[str, float]:
        """Metrics of the current head/tail with the server's trunk: head -> trunk -> tail, nothing kept."""
        client = SplitClient(head, tail, PatientChannel(channel), cfg, total_steps=1)  # type: ignore[arg-type]
        client.round = round
        modes = head.training, tail.training
        head.eval(), tail.eval()
        try:
            access = function_access(client._eval_logits, self.tokenizer, client.eval_target_logprobs)
            metrics = local_metrics(access, self.tokenizer, self.data, self.settings, generate=self.generate)
        finally:
            head.train(modes[0]), tail.train(modes[1])
        self.history.append({"round": round, **metrics})
        return metrics


def eval_report(
    evaluator: LocalEvaluator | None, head: Head, tail: Tail, channel: Channel, cfg: TrainConfig, round: int
) -> pb.EvalReport:
    """The EVAL_REPORT of one round: aggregate numbers only (no held-out data: an empty report)."""
    if evaluator is None or not evaluator.data:
        return pb.EvalReport(round=round, num_examples=0)
    metrics = evaluator.evaluate(head, tail, channel, cfg, round)
    return pb.EvalReport(round=round, num_examples=len(evaluator.data), metrics=metrics)


# -- the in-run privacy audit ------------------------------------------------------------------------
@dataclass
class PrivacyAudit:
    """Attacks (a) and (b) on what this client's head sent; ``history`` keeps each round's scores."""

    samples: int = 4  # batches of the round attacked
    noise_std: float = 0.0  # privacy.hidden_noise_std: the audit scores what went on the wire
    inverter: Any = None  # fedsplit.attacks.inversion.Inverter fitted on public text, or None: attack (a) only
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"audit samples: expected >= 1, got {self.samples!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"audit noise_std: expected >= 0, got {self.noise_std!r}")

    @torch.no_grad()
    def scores(self, head: Head, batches: Sequence[Batch], round: int) -> dict[str, float]:
        """``audit_*`` metrics: token recovery of each attack, pooled over the sampled batches' real tokens."""
        from fedsplit.attacks.audit import audit_batch  # attack code only where the audit runs

        if not batches:
            return {}
        step = max(1, len(batches) // self.samples)
        picked = list(batches[::step])[: self.samples]  # spread over the round
        embed: Any = head.get_submodule(head.spec.embed)
        embedding = embed.weight.detach()  # (V, H): what nearest-neighbour inversion searches
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round)
        training = head.training
        head.eval()
        try:
            results = [audit_batch(head, embedding, b["input_ids"], b["attention_mask"], inverter=self.inverter,
                                   noise_std=self.noise_std, generator=generator) for b in picked]
        finally:
            head.train(training)
        positions = sum(r.positions for r in results)
        out = {AUDIT_PREFIX + "positions": float(positions),
               AUDIT_PREFIX + "nearest_neighbour": sum(r.nearest_neighbour * r.positions for r in results)
               / max(1, positions)}
        if self.inverter is not None:
            out[AUDIT_PREFIX + "learned"] = sum((r.learned or 0.0) * r.positions for r in results) / max(1, positions)
        self.history.append({"round": round, **out})
        return out
