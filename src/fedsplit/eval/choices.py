"""Classification examples with their answer candidates: one verbalized response per label.

A task with a verbalizer (RTE, CB, COPA, BoolQ, emotion, or a user's mapping, see
:mod:`fedsplit.data.tasks`) is scored as multiple choice: every label's verbalization of the record
(``yes``/``no``/``maybe``, or COPA's ``{choice1}``/``{choice2}`` sentences) is a candidate answer,
in the verbalizer's label order; the gold label is the record's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsplit.data.harmonize import SourceConfig, label_key, to_example
from fedsplit.data.readers import Record, read_records
from fedsplit.data.schema import Example
from fedsplit.data.tasks import FieldMapping, template_fields


@dataclass(frozen=True)
class ChoiceExample:
    """An example (prompt + gold response) and every label's candidate response."""

    example: Example
    labels: tuple[str, ...]  # label keys, the verbalizer's order
    choices: tuple[str, ...]  # candidate response per label
    gold: int  # index of the record's label

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.choices) or not 0 <= self.gold < len(self.choices):
            raise ValueError(f"{self.example.source}: expected one choice per label and a gold index among them")


def is_classification(mapping: FieldMapping) -> bool:
    return mapping.verbalizer is not None


def verbalize(record: Record, template: str) -> str:
    text = template.format_map({name: record.get(name, str) for name in template_fields(template)})
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def to_choice_example(record: Record, mapping: FieldMapping, *, id: str) -> ChoiceExample:
    if mapping.verbalizer is None:
        raise ValueError("to_choice_example: expected a task with a verbalizer (a classification task)")
    example = to_example(record, mapping, id=id)
    assert example is not None  # skip_empty is off: a blank response raised
    name = next((f for f in mapping.response_fields if f in record.fields), mapping.response_fields[0])
    key = label_key(record.get(name, (str, int, bool)), mapping.label_names)
    labels = tuple(mapping.verbalizer)
    choices = tuple(verbalize(record, mapping.verbalizer[label]) for label in labels)
    return ChoiceExample(example, labels, choices, labels.index(key))  # to_example checked the label


def load_choice_examples(cfg: SourceConfig) -> list[ChoiceExample]:
    """Like :func:`fedsplit.data.load_examples`, with every label's candidate for each record."""
    mapping = cfg.field_mapping()
    prefix = f"{cfg.task or 'custom'}/{Path(cfg.path).name}"
    items: list[ChoiceExample] = []
    for record in read_records(cfg.path, cfg.format):
        items.append(to_choice_example(record, mapping, id=f"{prefix}/{record.index}"))
        if len(items) == cfg.limit:
            break
    return items
