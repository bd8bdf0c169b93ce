"""Held-out loss and ROUGE-L of an unsplit model (base, merged federated adapters, or centralized)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedsplit.config import RunConfig
from fedsplit.data import Example
from fedsplit.eval import mean_rouge_l
from fedsplit.recipes.common import encode, eval_batches, generate_answers
from fedsplit.split.parts import positions_from_mask
from fedsplit.train.optim import token_weighted_loss


@dataclass
class EvalResult:
    loss: float
    rouge_l: float | None
    samples: list[tuple[str, str, str]]  # (question, reference, answer)


@torch.no_grad()
def heldout_loss(model, batches: Sequence[dict]) -> float:
    """Token-weighted mean loss on supervised tokens, positions from the mask as in training."""

    def logits(batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"]
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits

    progress = tqdm(batches, desc="held-out loss", unit="batch", leave=False)
    return token_weighted_loss((logits(batch), batch["labels"]) for batch in progress)


def evaluate(model, tokenizer, examples: Sequence[Example], cfg: RunConfig) -> EvalResult:
    model.eval()
    batches = eval_batches(
        encode(examples, tokenizer, cfg), cfg.train.batch_size * 2, tokenizer.pad_token_id, cfg.train.padding_side
    )
    loss = heldout_loss(model, batches)
    rouge, samples = None, []
    subset = list(examples[: cfg.eval.rouge_examples])
    if subset:
        answers = generate_answers(model, tokenizer, subset, cfg.eval.max_new_tokens)
        references = [example.response for example in subset]
        rouge = mean_rouge_l(answers, references)
        samples = [(e.prompt_messages[-1].content, r, a) for e, r, a in zip(subset, references, answers, strict=False)]
    return EvalResult(loss, rouge, samples)
