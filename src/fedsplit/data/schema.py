"""The canonical training example every data source is harmonized into.

FL-GLM (arXiv 2406.14898) fine-tunes a chat LLM on each client's private instruction data; whatever
the source schema, a client ends up with a list of :class:`Example`: a short chat conversation
(optional system prompt, then alternating user/assistant turns) whose **last assistant turn** is the
response the loss is computed on. Earlier turns are context, as is the system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedsplit.data.errors import DataError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role = field(metadata={"help": "who speaks: 'system', 'user' or 'assistant'"})
    content: str = field(metadata={"help": "the turn's text; must not be blank"})

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"Message.role: expected one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise DataError(f"Message.content: expected str, got {type(self.content).__name__}")
        if not self.content.strip():
            raise DataError(f"Message.content: expected non-blank text for a {self.role} turn, got {self.content!r}")


@dataclass(frozen=True)
class Example:
    """A conversation whose final assistant turn is supervised, with where it came from."""

    messages: tuple[Message, ...] = field(
        metadata={"help": "[system], user, assistant, user, assistant, ...; must end with an assistant turn"}
    )
    source: str = field(metadata={"help": "provenance, 'file:line' (or 'hf://name:split:row', 'stdlib:json.dumps')"})
    id: str = field(metadata={"help": "stable identifier, unique within a data set"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))  # accept any sequence, store immutably
        for name in ("source", "id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"Example.{name}: expected a non-empty str, got {getattr(self, name)!r}")
        if not all(isinstance(m, Message) for m in self.messages):
            raise DataError(f"{self.source}: Example.messages: expected Message items")
        roles = [m.role for m in self.messages]
        if not valid_roles(roles):
            raise DataError(
                f"{self.source}: Example.messages: expected roles [system], user, assistant, user, ..., "
                f"assistant, got {roles}"
            )

    @classmethod
    def from_pair(cls, prompt: str, response: str, *, source: str, id: str, system: str | None = None) -> Example:
        """The common case: ``[system], user(prompt), assistant(response)``."""
        head = [Message("system", system)] if system is not None else []
        return cls((*head, Message("user", prompt), Message("assistant", response)), source=source, id=id)

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the supervised response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """The supervised text: the last assistant turn."""
        return self.messages[-1].content


def valid_roles(roles: Sequence[str]) -> bool:
    """Optional system first, then user/assistant alternating, ending with an assistant turn."""
    turns = roles[1:] if roles[:1] == ["system"] else roles
    alternating = all(role == ("user", "assistant")[i % 2] for i, role in enumerate(turns))
    return alternating and len(turns) >= 2 and len(turns) % 2 == 0
