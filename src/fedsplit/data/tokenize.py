"""Tokenization for supervised fine-tuning with the loss on the response only, and batch collation.

In FL-GLM (arXiv 2406.14898) the labels never leave the client: the client's tail computes the
loss. :func:`encode_example` produces ``labels`` aligned with ``input_ids`` (Hugging Face
convention: the model shifts them), ``-100`` everywhere except the tokens of the final assistant
turn, including its end-of-turn token.

The conversation is rendered with the tokenizer's chat template when it has one; otherwise with the
plain format of :func:`render_plain`. The response span is found by rendering the conversation with
and without the final assistant turn and comparing the two token sequences, so it does not depend on
how a particular template spells its turn markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsplit.data.errors import DataError
from fedsplit.data.schema import Example, Message

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
PADDING_SIDES = ("right", "left")
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and aligned labels (``IGNORE_INDEX`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if not self.input_ids or len(self.input_ids) != len(self.labels):
            lengths = f"{len(self.input_ids)} and {len(self.labels)}"
            raise ValueError(f"expected equally long, non-empty input_ids and labels, got lengths {lengths}")

    @property
    def num_supervised(self) -> int:
        """How many tokens carry a loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_plain(messages: Sequence[Message], eos_token: str, add_generation_prompt: bool) -> str:
    """The fallback format for tokenizers without a chat template::

        System: {system}\\n\\nUser: {prompt}\\n\\nAssistant: {response}{eos}\\n\\n

    With ``add_generation_prompt`` it ends in ``Assistant:``, where the response starts.
    """
    ends = {"system": "", "user": "", "assistant": eos_token}
    turns = [f"{PLAIN_ROLE_NAMES[m.role]}: {m.content}{ends[m.role]}\n\n" for m in messages]
    return "".join(turns) + ("Assistant:" if add_generation_prompt else "")


def _render_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool
) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # the template has them
    text = render_plain(messages, tokenizer.eos_token or "", add_generation_prompt)
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]  # e.g. a BOS, if the model uses one


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_prompt_response(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of the rendered conversation; the response ends with an end-of-turn token.

    The response starts where the rendering without the final assistant turn (plus the generation
    prompt) stops matching the full rendering. It ends at the last non-whitespace token of the full
    rendering (dropping the template's newline between turns); if that is not a special token (no
    end-of-turn marker in the template), the tokenizer's EOS is appended so the model learns to stop.
    """
    prompt = _render_ids(tokenizer, example.prompt_messages, add_generation_prompt=True)
    full = _render_ids(tokenizer, example.messages, add_generation_prompt=False)
    start = _common_prefix_length(prompt, full)
    end = len(full)
    while end > start and not tokenizer.decode(full[end - 1 : end]).strip():  # type: ignore[union-attr]  # one id list decodes to a str
        end -= 1
    response = full[start:end]
    if not response:
        raise DataError(f"{example.source}: the rendered conversation has no response tokens to supervise")
    if response[-1] not in tokenizer.all_special_ids and tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    return full[:start], response


def encode_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedExample:
    """Tokenize ``example`` with labels on its response only, truncated to ``max_length`` tokens.

    Truncation keeps the response and cuts the prompt from the left (its start goes first, the
    assistant header stays). If the response alone does not fit, it keeps the last prompt token (the
    first response token needs something to be predicted from) and the start of the response.
    """
    return encode_and_truncate(example, tokenizer, max_length)[0]


def encode_and_truncate(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[EncodedExample, bool]:
    """:func:`encode_example`, and whether the example had to be truncated to fit ``max_length``."""
    if type(max_length) is not int or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2 (one context + one supervised token), got {max_length!r}")
    prompt, response = split_prompt_response(example, tokenizer)
    truncated = len(prompt) + len(response) > max_length
    response = response[: max_length - 1]
    prompt = prompt[max(0, len(prompt) + len(response) - max_length) :]
    return EncodedExample(prompt + response, [IGNORE_INDEX] * len(prompt) + response), truncated


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[EncodedExample]:
    """:func:`encode_example` over a list."""
    return [encode_example(example, tokenizer, max_length) for example in examples]


def _pad(sequence: list[int], width: int, value: int, side: str) -> list[int]:
    padding = [value] * (width - len(sequence))
    return sequence + padding if side == "right" else padding + sequence


def collate(
    batch: Sequence[EncodedExample], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ``input_ids``, ``attention_mask`` and ``labels``, each (B, T) long.

    Padding has attention 0 and label ``IGNORE_INDEX``. Position ids are not returned: the model
    derives them from the attention mask (which matters for left padding).
    """
    import torch

    if not batch:
        raise ValueError("batch: expected at least one EncodedExample, got none")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side: expected one of {', '.join(PADDING_SIDES)}, got {padding_side!r}")
    if type(pad_token_id) is not int or pad_token_id < 0:
        raise ValueError(f"pad_token_id: expected a non-negative int, got {pad_token_id!r}")
    width = max(len(example.input_ids) for example in batch)  # T
    columns = {
        "input_ids": [_pad(e.input_ids, width, pad_token_id, padding_side) for e in batch],
        "attention_mask": [_pad([1] * len(e.input_ids), width, 0, padding_side) for e in batch],
        "labels": [_pad(e.labels, width, IGNORE_INDEX, padding_side) for e in batch],
    }
    return {name: torch.tensor(rows, dtype=torch.long) for name, rows in columns.items()}  # each (B, T)
