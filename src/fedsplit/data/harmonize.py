"""Harmonization: any supported source, one canonical list of :class:`Example`.

Each FL-GLM client (arXiv 2406.14898) fine-tunes on its own private data, in whatever schema it has.
A :class:`SourceConfig` names the source and either a known task (:data:`fedsplit.data.tasks.TASKS`)
or an explicit field mapping; :func:`load_examples` reads the records and renders each one as
``[system], user(prompt), assistant(response)``. Rendered text has its line endings normalized to
``\\n`` and surrounding whitespace stripped. Ids are ``<task or 'custom'>/<file name>/<record index>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsplit.data.readers import READERS, Record, read_records
from fedsplit.data.schema import Example
from fedsplit.data.tasks import TASKS, FieldMapping, template_fields

EMPTY_RESPONSE_POLICIES = ("error", "skip")
_MAPPING_FIELDS = ("prompt_template", "response_field", "verbalizer", "label_names")


@dataclass
class SourceConfig:
    """One data source and how to read it: a known ``task`` or an explicit field mapping."""

    path: str = field(metadata={"help": "file path, or hf://[owner/]name[/config]:split"})
    format: str | None = field(default=None, metadata={"help": "jsonl, json, csv, tsv, parquet or hf; None: by suffix"})
    task: str | None = field(default=None, metadata={"help": f"a known task: {', '.join(TASKS)}"})
    prompt_template: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "'{field}' template(s); several: first with all fields present wins"}
    )
    response_field: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "field holding the response or label (first present of several)"}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "system turn (overrides the task's)"})
    verbalizer: dict[str, str] | None = field(
        default=None, metadata={"help": "label -> response text; None: the response field is the text"}
    )
    label_names: tuple[str, ...] = field(default=(), metadata={"help": "names of integer labels 0, 1, ..."})
    limit: int | None = field(default=None, metadata={"help": "keep at most this many examples (file order)"})
    on_empty_response: str = field(default="error", metadata={"help": "blank response: 'error' or 'skip'"})

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"path: expected a non-empty path or hf:// URI, got {self.path!r}")
        self.path = str(self.path)
        if self.format is not None and self.format not in READERS:
            raise ValueError(f"format: expected None or one of {', '.join(READERS)}, got {self.format!r}")
        if self.limit is not None and (type(self.limit) is not int or self.limit < 1):
            raise ValueError(f"limit: expected None or a positive int, got {self.limit!r}")
        if self.on_empty_response not in EMPTY_RESPONSE_POLICIES:
            expected = " or ".join(map(repr, EMPTY_RESPONSE_POLICIES))
            raise ValueError(f"on_empty_response: expected {expected}, got {self.on_empty_response!r}")
        self._check_task_or_mapping()
        self.field_mapping()  # validates templates and verbalizer now, not at the first record

    def _check_task_or_mapping(self) -> None:
        given = [name for name in _MAPPING_FIELDS if getattr(self, name)]
        if self.task is not None:
            if self.task not in TASKS:
                raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
            if given:
                raise ValueError(f"expected either task or an explicit mapping, got task={self.task!r} and {given}")
        elif self.prompt_template is None or self.response_field is None:
            raise ValueError("expected task=... or both prompt_template and response_field, got neither")

    def field_mapping(self) -> FieldMapping:
        """The task's mapping (with this config's system prompt, if any) or the explicit one."""
        if self.task is not None:
            task = TASKS[self.task]
            system = self.system_prompt if self.system_prompt is not None else task.system_prompt
            return FieldMapping(task.prompt_templates, task.response_fields, system, task.verbalizer, task.label_names)
        return FieldMapping(
            prompt_templates=_as_tuple(self.prompt_template),
            response_fields=_as_tuple(self.response_field),
            system_prompt=self.system_prompt,
            verbalizer=self.verbalizer,
            label_names=tuple(self.label_names),
        )


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def load_examples(cfg: SourceConfig) -> list[Example]:
    """Read ``cfg``'s source and harmonize every record; the first bad record raises ``DataError``."""
    mapping = cfg.field_mapping()
    prefix = f"{cfg.task or 'custom'}/{Path(cfg.path).name}"
    skip_empty = cfg.on_empty_response == "skip"
    examples: list[Example] = []
    for record in read_records(cfg.path, cfg.format):
        example = to_example(record, mapping, id=f"{prefix}/{record.index}", skip_empty=skip_empty)
        if example is not None:
            examples.append(example)
        if len(examples) == cfg.limit:
            break
    return examples


def to_example(record: Record, mapping: FieldMapping, *, id: str, skip_empty: bool = False) -> Example | None:
    """One record as an :class:`Example`; ``None`` for a blank response when ``skip_empty``."""
    prompt = render_prompt(record, mapping)
    response_field, response = render_response(record, mapping)
    if not response:
        if skip_empty:
            return None
        hint = "on_empty_response='skip' drops such records"
        raise record.error(f"expected a non-blank response, got blank text ({hint})", response_field)
    return Example.from_pair(prompt, response, source=record.source, id=id, system=mapping.system_prompt)


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def render_prompt(record: Record, mapping: FieldMapping) -> str:
    """The first template whose fields are all present and non-blank (else the last one), filled in."""
    applicable = [t for t in mapping.prompt_templates if all(_filled(record, f) for f in template_fields(t))]
    template = applicable[0] if applicable else mapping.prompt_templates[-1]
    prompt = _clean(template.format_map({name: record.get(name, str) for name in template_fields(template)}))
    if not prompt:
        raise record.error(f"expected a non-blank prompt, got blank text from template {template!r}")
    return prompt


def _filled(record: Record, name: str) -> bool:
    value = record.fields.get(name)
    return value is not None and (not isinstance(value, str) or bool(value.strip()))


def render_response(record: Record, mapping: FieldMapping) -> tuple[str, str]:
    """(the field used, the response text): the field's text, or its label's verbalization."""
    name = next((f for f in mapping.response_fields if f in record.fields), mapping.response_fields[0])
    if mapping.verbalizer is None:
        return name, _clean(record.get(name, str))
    raw = record.get(name, (str, int, bool))
    key = label_key(raw, mapping.label_names)
    if key is None or key not in mapping.verbalizer:
        raise record.error(f"unknown label {raw!r}: expected one of {_known_labels(mapping)}", name)
    template = mapping.verbalizer[key]
    return name, _clean(template.format_map({f: record.get(f, str) for f in template_fields(template)}))


def label_key(raw: str | int | bool, label_names: Sequence[str]) -> str | None:
    """A raw label as a verbalizer key: bools -> 'true'/'false'; ints and digit strings -> their name
    (``label_names[i]``, or the digits when there are no names); other strings -> lower-cased."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    text = str(raw).strip()
    if not (text.isascii() and text.isdigit()):
        return text.lower() if isinstance(raw, str) else None  # a negative int is never a label
    if not label_names:
        return str(int(text))
    index = int(text)
    return label_names[index].lower() if index < len(label_names) else None


def _known_labels(mapping: FieldMapping) -> str:
    names = ", ".join(repr(key) for key in mapping.verbalizer or {})
    count = len(mapping.label_names)
    return f"{names} or an index 0..{count - 1}" if count else names
