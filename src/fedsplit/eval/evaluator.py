"""Held-out evaluation of one data split: classification by log-likelihood ranking, generation by ROUGE.

The measurements FL-GLM (arXiv 2406.14898) compares federated split and centralized training on:

- **classification** (RTE, CB, COPA, BoolQ, emotion, any task with a verbalizer): every label's
  verbalized answer is scored by the sum of its tokens' log-probabilities given the prompt, as
  lm-evaluation-harness scores multiple choice; the best is the prediction (``accuracy``,
  ``macro_f1``). ``accuracy_norm`` ranks by log-likelihood per byte of the answer (harness
  ``acc_norm``). ``exact_match``: the greedy answer equals the gold verbalization.
- **generation** (SAMSum, Alpaca, stdlib-docs): token-weighted held-out ``loss`` on the responses
  and ``perplexity``; ROUGE-1/2/L F1 of greedy answers (``rouge-score``).

Every report is a flat metric dict with ``n`` examples and 95 % intervals (``<name>_ci_low/high``);
per-client reports pool exactly with :func:`fedsplit.eval.stats.aggregate_metrics`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from fedsplit.data.schema import Example, Message
from fedsplit.data.tokenize import IGNORE_INDEX, EncodedExample, encode_examples, split_prompt_response
from fedsplit.eval.choices import ChoiceExample
from fedsplit.eval.rouge import rouge_f1_per_example
from fedsplit.eval.scoring import ModelAccess, sequence_logprobs
from fedsplit.eval.stats import (
    CI_HIGH,
    CI_LOW,
    confusion_matrix,
    confusion_metrics,
    macro_f1,
    macro_f1_interval,
    mean_interval,
    with_wilson,
)


@dataclass
class EvalSettings:
    """How to evaluate; the same for every model compared."""

    max_length: int = field(default=256, metadata={"help": "tokens per scored sequence (prompt cut from the left)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation tasks: length of the greedy answer"})
    exact_match: bool = field(default=True, metadata={"help": "classification: also greedy answers (exact match)"})
    seed: int = field(default=0, metadata={"help": "bootstrap resampling seed"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"eval.{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise ValueError(f"eval.max_length: expected >= 2, got {self.max_length}")


@dataclass
class EvalReport:
    kind: str  # "classification" or "generation"
    metrics: dict[str, float]  # flat; "n" examples, intervals as <name>_ci_low / <name>_ci_high
    samples: list[dict[str, Any]]  # per example: id, reference, prediction (and scores)

    @property
    def n(self) -> int:
        return int(self.metrics["n"])


def evaluate_split(
    access: ModelAccess, tokenizer, data: Sequence[ChoiceExample] | Sequence[Example], settings: EvalSettings
) -> EvalReport:
    """Evaluate one data split: classification if its items carry choices, else generation."""
    if not data:
        raise ValueError("evaluate_split: expected at least one example, got none")
    if all(isinstance(item, ChoiceExample) for item in data):
        return evaluate_classification(access, tokenizer, data, settings)  # type: ignore[arg-type]
    if all(isinstance(item, Example) for item in data):
        return evaluate_generation(access, tokenizer, data, settings)  # type: ignore[arg-type]
    raise TypeError("evaluate_split: expected all ChoiceExample (classification) or all Example (generation)")


# -- classification ------------------------------------------------------------------------------
def _with_response(example: Example, response: str) -> Example:
    return Example((*example.prompt_messages, Message("assistant", response)), source=example.source, id=example.id)


def candidate_ids(example: Example, choice: str, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with the answer as the assistant's turn, without its end-of-turn token."""
    prompt, response = split_prompt_response(_with_response(example, choice), tokenizer)
    if len(response) > 1 and response[-1] in tokenizer.all_special_ids:
        response = response[:-1]  # harness-style: the answer text's own tokens only
    return prompt, response


def _scored(prompt: list[int], answer: list[int], max_length: int) -> EncodedExample:
    answer = answer[: max_length - 1]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
    return EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: ``" Yes."`` == ``"yes"``."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".!?,;:\"'").strip()


def evaluate_classification(
    access: ModelAccess, tokenizer, items: Sequence[ChoiceExample], settings: EvalSettings
) -> EvalReport:
    sequences, answer_lengths = [], []
    for item in items:
        for choice in item.choices:
            prompt, answer = candidate_ids(item.example, choice, tokenizer)
            sequences.append(_scored(prompt, answer, settings.max_length))
            answer_lengths.append(len(answer))
    scores = sequence_logprobs(access, sequences, batch_size=settings.batch_size, desc="ranking answers",
                               progress=settings.progress)
    gold: list[int] = []
    predicted: list[int] = []
    predicted_norm: list[int] = []
    samples: list[dict[str, Any]] = []
    offset = 0
    for item in items:
        loglik = [s for s, _ in scores[offset : offset + len(item.choices)]]
        offset += len(item.choices)
        per_byte = [ll / max(1, len(choice.encode())) for ll, choice in zip(loglik, item.choices, strict=True)]
        gold.append(item.gold)
        predicted.append(max(range(len(loglik)), key=loglik.__getitem__))
        predicted_norm.append(max(range(len(per_byte)), key=per_byte.__getitem__))
        samples.append({"id": item.example.id, "reference": item.choices[item.gold],
                        "prediction": item.choices[predicted[-1]], "loglik": loglik})
    n, classes = len(items), len(items[0].labels)
    matrix = confusion_matrix(gold, predicted, classes)
    metrics: dict[str, float] = {
        "n": float(n),
        "accuracy": sum(g == p for g, p in zip(gold, predicted, strict=True)) / n,
        "accuracy_norm": sum(g == p for g, p in zip(gold, predicted_norm, strict=True)) / n,
        "macro_f1": macro_f1(matrix),
    }
    metrics["macro_f1" + CI_LOW], metrics["macro_f1" + CI_HIGH] = macro_f1_interval(gold, predicted, classes,
                                                                                    seed=settings.seed)
    if settings.exact_match:
        longest = max(length for length in answer_lengths) + 1
        generated = _generate(access, tokenizer, [item.example for item in items], longest, settings)
        hits = [normalize_answer(text) == normalize_answer(item.choices[item.gold])
                for text, item in zip(generated, items, strict=True)]
        metrics["exact_match"] = sum(hits) / n
        for sample, text in zip(samples, generated, strict=True):
            sample["generated"] = text
    metrics.update(confusion_metrics(matrix))
    return EvalReport("classification", with_wilson(metrics, n), samples)


# -- generation ----------------------------------------------------------------------------------
def _generate(access: ModelAccess, tokenizer, examples: Sequence[Example], max_new_tokens: int,
              settings: EvalSettings) -> list[str]:
    budget = max(1, settings.max_length - max_new_tokens)
    prompts = []
    for example in examples:
        prompt, _ = split_prompt_response(example, tokenizer)
        prompts.append(prompt[-budget:])
    answers: list[str] = []
    starts = range(0, len(prompts), settings.batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not settings.progress, leave=False):
        new = access.generate(prompts[start : start + settings.batch_size], max_new_tokens)
        answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
    return answers


def evaluate_generation(
    access: ModelAccess, tokenizer, examples: Sequence[Example], settings: EvalSettings
) -> EvalReport:
    encoded = encode_examples(examples, tokenizer, settings.max_length)
    scores = sequence_logprobs(access, encoded, batch_size=settings.batch_size, desc="held-out loss",
                               progress=settings.progress)
    tokens = sum(count for _, count in scores)
    loss = -sum(s for s, _ in scores) / tokens
    references = [example.response for example in examples]
    answers = _generate(access, tokenizer, examples, settings.max_new_tokens, settings)
    rouge = rouge_f1_per_example(answers, references)
    n = len(examples)
    metrics: dict[str, float] = {"n": float(n), "loss": loss, "tokens": float(tokens), "perplexity": math.exp(loss)}
    for name, values in rouge.items():
        metrics[name] = sum(values) / n
        metrics[name + CI_LOW], metrics[name + CI_HIGH] = mean_interval(values, seed=settings.seed)
    samples = [{"id": e.id, "reference": r, "prediction": a, "rougeL": s}
               for e, r, a, s in zip(examples, references, answers, rouge["rougeL"], strict=True)]
    return EvalReport("generation", metrics, samples)
