"""Per-task facts: how each known source schema maps onto a prompt/response pair.

The :data:`TASKS` table covers the public sets in the project's shared data (SuperGLUE RTE, CB,
COPA, BoolQ, SAMSum, Alpaca, emotion), the kind of downstream tasks FL-GLM (arXiv 2406.14898)
fine-tunes on. Their schemas differ on purpose (CB train labels are ints, validation labels are
strings; BoolQ train calls its label ``answer``, validation ``label``); a :class:`FieldMapping`
absorbs those differences with data, not code:

- ``prompt_templates`` are ``str.format`` templates with plain ``{field}`` placeholders, tried in
  order: the first whose fields are all present and non-blank is used (the last one always is);
  that is how Alpaca's optional ``input`` works.
- ``response_fields``: the first one present in the record holds the response (or the label).
- ``verbalizer`` maps a label to the response text; its values are templates too (COPA answers with
  the chosen sentence, ``{choice1}``). Without a verbalizer the response field is the text itself.
- ``label_names`` give integer labels their names (``label_names[i]``), so ``0``, ``"0"`` and
  ``"entailment"`` all mean the same label; booleans become ``"true"``/``"false"``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_FORMATTER = string.Formatter()


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` names a template uses, in order; anything but plain names is rejected."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"template: expected non-blank str, got {template!r}")
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"template {template!r}: expected balanced {{field}} placeholders ({exc})") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"template {template!r}: expected plain {{field}} placeholders, got {{{name}...}}")
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class FieldMapping:
    """How one source schema becomes ``[system], user(prompt), assistant(response)``."""

    prompt_templates: tuple[str, ...] = field(metadata={"help": "tried in order; first with all fields wins"})
    response_fields: tuple[str, ...] = field(metadata={"help": "first present field holds the response/label"})
    system_prompt: str | None = field(default=None, metadata={"help": "optional system turn"})
    verbalizer: Mapping[str, str] | None = field(
        default=None, metadata={"help": "label -> response template (keys case-insensitive); None: text response"}
    )
    label_names: tuple[str, ...] = field(default=(), metadata={"help": "names of integer labels 0, 1, ..."})

    def __post_init__(self) -> None:
        if isinstance(self.prompt_templates, str) or not self.prompt_templates:
            got = repr(self.prompt_templates)
            raise ValueError(f"prompt_templates: expected a non-empty tuple of templates, got {got}")
        for template in self.prompt_templates:
            template_fields(template)
        fields = self.response_fields
        if isinstance(fields, str) or not fields or not all(isinstance(f, str) and f for f in fields):
            raise ValueError(f"response_fields: expected non-empty field names, got {self.response_fields!r}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError(f"system_prompt: expected None or non-blank text, got {self.system_prompt!r}")
        if self.verbalizer is not None:
            object.__setattr__(self, "verbalizer", _normalized_verbalizer(self.verbalizer))
        elif self.label_names:
            raise ValueError(f"label_names: expected none without a verbalizer, got {self.label_names!r}")
        missing = [name for name in self.label_names if name.lower() not in (self.verbalizer or {})]
        if missing:
            raise ValueError(f"label_names: expected every name to be a verbalizer key, got unknown {missing}")


def _normalized_verbalizer(verbalizer: Mapping[str, str]) -> Mapping[str, str]:
    """Lower-case, stripped keys (labels are matched case-insensitively); values checked as templates."""
    if not verbalizer:
        raise ValueError("verbalizer: expected at least one label, got an empty mapping")
    normalized = {}
    for label, response in verbalizer.items():
        key = str(label).strip().lower()
        if key in normalized:
            raise ValueError(f"verbalizer: labels collide when matched case-insensitively: {key!r}")
        template_fields(response)
        normalized[key] = response
    return MappingProxyType(normalized)


def _yes_no_maybe(*names: str) -> dict[str, str]:
    return dict(zip(names, ("yes", "no", "maybe"), strict=False))


NLI = "Premise: {premise}\nHypothesis: {hypothesis}\n"
EMOTIONS = ("sadness", "joy", "love", "anger", "fear", "surprise")  # dair-ai/emotion's label order

TASKS: Mapping[str, FieldMapping] = MappingProxyType(
    {
        "rte": FieldMapping(
            prompt_templates=(NLI + "Does the premise entail the hypothesis? Answer yes or no.",),
            response_fields=("label",),
            verbalizer=_yes_no_maybe("entailment", "not_entailment"),
            label_names=("entailment", "not_entailment"),
        ),
        "cb": FieldMapping(
            prompt_templates=(NLI + "Is the hypothesis true given the premise? Answer yes, no or maybe.",),
            response_fields=("label",),
            verbalizer=_yes_no_maybe("entailment", "contradiction", "neutral"),
            label_names=("entailment", "contradiction", "neutral"),
        ),
        "copa": FieldMapping(
            prompt_templates=(
                "Premise: {premise}\nWhat was the {question}?\nOption 1: {choice1}\nOption 2: {choice2}\n"
                "Answer with the more plausible option.",
            ),
            response_fields=("label",),
            verbalizer={"choice1": "{choice1}", "choice2": "{choice2}"},
            label_names=("choice1", "choice2"),
        ),
        "boolq": FieldMapping(
            prompt_templates=("Passage: {passage}\nQuestion: {question}?\nAnswer yes or no.",),
            response_fields=("label", "answer"),  # validation calls it label, train answer
            verbalizer={"true": "yes", "false": "no"},
            label_names=("false", "true"),
        ),
        "samsum": FieldMapping(
            prompt_templates=("Summarize this dialogue:\n{context}",),
            response_fields=("response",),
        ),
        "alpaca": FieldMapping(
            prompt_templates=("{instruction}\n\nInput:\n{input}", "{instruction}"),
            response_fields=("output",),
        ),
        "emotion": FieldMapping(
            prompt_templates=(f"Which emotion does this text express ({', '.join(EMOTIONS)})?\nText: {{text}}",),
            response_fields=("label",),
            verbalizer={name: name for name in EMOTIONS},
            label_names=EMOTIONS,
        ),
    }
)
