from __future__ import annotations

import pytest
import torch

from fedsplit.data import Example
from fedsplit.data.harmonize import SourceConfig
from fedsplit.data.tokenize import IGNORE_INDEX, EncodedExample
from fedsplit.eval.choices import ChoiceExample, load_choice_examples
from fedsplit.eval.evaluator import EvalSettings, candidate_ids, evaluate_split, normalize_answer
from fedsplit.eval.scoring import ModelAccess, function_access, sequence_logprobs, unsplit_access, unsplit_logits
from fedsplit.eval.stats import aggregate_metrics

from tiny import CB_ROWS

SETTINGS = EvalSettings(max_length=48, batch_size=4, max_new_tokens=3, progress=False)

@pytest.fixture
def cb_items(tmp_path) -> list[ChoiceExample]:
    import json

    path = tmp_path / "cb.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CB_ROWS))
    return load_choice_examples(SourceConfig(path=str(path), task="cb"))


def _generation_examples(n: int) -> list[Example]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return [Example.from_pair(f"Summarize: {' '.join(words[i:] + words[:i])}", " ".join(words[i : i + 3]),
                              source=f"test:{i}", id=str(i)) for i in range(n)]


def test_choice_examples_carry_every_label_and_the_gold_one(cb_items) -> None:
    item = cb_items[1]

    assert item.labels == ("entailment", "contradiction", "neutral")
    assert item.choices == ("yes", "no", "maybe")
    assert item.gold == 1 and item.example.response == "no"


def test_ranking_picks_the_planted_answer(tiny_llama, cb_items) -> None:
    # Arrange: a model that puts all its mass on the tokens of "maybe"
    model, tokenizer = tiny_llama
    _, planted = candidate_ids(cb_items[0].example, "maybe", tokenizer)
    vocab = model.config.vocab_size

    def logits(batch, keep=None):
        out = torch.full((*batch["input_ids"].shape, vocab), -10.0)  # (B, T, V)
        out[..., planted] = 10.0
        return out[:, -keep:] if keep else out

    access = ModelAccess(logits, lambda prompts, n: [[] for _ in prompts], tokenizer.pad_token_id)

    # Act
    report = evaluate_split(access, tokenizer, cb_items, EvalSettings(max_length=64, exact_match=False, progress=False))

    # Assert: "maybe" is gold for 2 of 7 examples; every prediction is "maybe"
    assert report.metrics["accuracy"] == pytest.approx(2 / 7)
    assert all(sample["prediction"] == "maybe" for sample in report.samples)
    assert report.metrics["cm.2.2"] == 2 and report.metrics["cm.0.2"] == 2


def test_scores_do_not_depend_on_batching_or_padding(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    access = unsplit_access(model, tokenizer)
    seqs = [EncodedExample(list(range(3, 3 + n)), [IGNORE_INDEX] * (n - 2) + list(range(1 + n, 3 + n)))
            for n in (4, 9, 17)]

    alone = [sequence_logprobs(access, [s], progress=False)[0] for s in seqs]
    together = sequence_logprobs(access, seqs, batch_size=3, progress=False)

    assert [c for _, c in together] == [2, 2, 2]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], abs=1e-4)


def test_logprob_is_the_model_own_log_softmax(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    ids = [5, 9, 11, 4]
    seq = EncodedExample(ids, [IGNORE_INDEX, IGNORE_INDEX, 11, 4])

    (total, count), = sequence_logprobs(unsplit_access(model, tokenizer), [seq], progress=False)

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert count == 2
    assert total == pytest.approx(float(logp[1, 11] + logp[2, 4]), abs=1e-5)


def test_uncached_greedy_decoding_equals_generate(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]

    cached = unsplit_access(model, tokenizer).generate(prompts, 5)
    uncached = function_access(unsplit_logits(model), tokenizer).generate(prompts, 5)

    assert uncached == cached


def test_pooled_evaluation_equals_aggregate_of_client_evaluations(tiny_llama, cb_items) -> None:
    model, tokenizer = tiny_llama
    access = unsplit_access(model, tokenizer)
    for data in (cb_items, _generation_examples(7)):
        pooled = evaluate_split(access, tokenizer, data, SETTINGS).metrics
        parts = (slice(0, 3), slice(3, 7))
        clients = [evaluate_split(access, tokenizer, data[s], SETTINGS) for s in parts]

        aggregated = aggregate_metrics([(r.metrics, r.n) for r in clients])

        for name, value in aggregated.items():
            assert value == pytest.approx(pooled[name], abs=1e-5), name
        assert {"accuracy", "macro_f1", "exact_match"} <= set(aggregated) or {"loss", "rougeL"} <= set(aggregated)


def test_generation_report_has_loss_perplexity_rouge_and_intervals(tiny_llama) -> None:
    model, tokenizer = tiny_llama

    report = evaluate_split(unsplit_access(model, tokenizer), tokenizer, _generation_examples(4), SETTINGS)

    m = report.metrics
    assert report.kind == "generation" and report.n == 4
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]


def test_normalize_answer() -> None:
    assert normalize_answer(" Yes.") == normalize_answer("yes") == "yes"
    assert normalize_answer("The  cat\nsat!") == "the cat sat"


def test_evaluation_through_the_split_equals_the_unsplit_model(tiny_llama, cb_items) -> None:
    # Arrange: a client's head -> server trunk -> tail, over the in-process channel
    from fedsplit.recipes.local import local_split
    from fedsplit.train.config import TrainConfig

    model, tokenizer = tiny_llama
    local = local_split(model, TrainConfig(), total_steps=1)
    settings = EvalSettings(max_length=64, batch_size=4, max_new_tokens=3, progress=False)

    # Act
    split = evaluate_split(function_access(local.client._eval_logits, tokenizer), tokenizer, cb_items[:4], settings)
    whole = evaluate_split(unsplit_access(model, tokenizer), tokenizer, cb_items[:4], settings)

    # Assert
    assert split.metrics == pytest.approx(whole.metrics, abs=1e-6)
    for a, b in zip(split.samples, whole.samples, strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
        assert a["generated"] == b["generated"]


def test_split_client_scores_row_by_row_without_the_batch_logits(tiny_llama) -> None:
    # Arrange: the split client's scores with its own target log-probs (LM head one row at a time)
    from fedsplit.recipes.local import local_split
    from fedsplit.train.config import TrainConfig

    model, tokenizer = tiny_llama
    local = local_split(model, TrainConfig(), total_steps=1)
    rows = function_access(local.client._eval_logits, tokenizer, local.client.eval_target_logprobs)
    seqs = [EncodedExample(list(range(3, 3 + n)), [IGNORE_INDEX] * (n - k) + list(range(1 + n, 1 + n + k)))
            for n, k in ((4, 2), (9, 5), (17, 16), (6, 1))]
    shapes: list[tuple[int, ...]] = []
    hook = local.parts.tail.output_head().register_forward_hook(lambda _m, args, _o: shapes.append(args[0].shape))

    # Act
    try:
        by_rows = sequence_logprobs(rows, seqs, batch_size=3, progress=False)
    finally:
        hook.remove()
    whole = sequence_logprobs(unsplit_access(model, tokenizer), seqs, batch_size=3, progress=False)

    # Assert: the same scores, and the LM head never saw more than one row's positions at once
    assert [c for _, c in by_rows] == [c for _, c in whole] == [2, 5, 16, 1]
    assert [s for s, _ in by_rows] == pytest.approx([s for s, _ in whole], abs=1e-4)
    assert len(shapes) == 4 and all(len(shape) == 2 for shape in shapes)  # (positions, H) per row, never (B, T, H)
