"""Tests for fedsplit.data.schema: messages and examples validate their roles and content."""

from __future__ import annotations

import pytest

from fedsplit.data import DataError, Example, Message


def test_from_pair_builds_user_then_assistant() -> None:
    example = Example.from_pair("What is 2+2?", "4", source="f.jsonl:3", id="t/0")

    assert [m.role for m in example.messages] == ["user", "assistant"]
    assert example.response == "4"
    assert example.prompt_messages == (Message("user", "What is 2+2?"),)


def test_from_pair_puts_the_system_prompt_first() -> None:
    example = Example.from_pair("q", "a", source="f:1", id="t/0", system="Be brief.")

    assert [m.role for m in example.messages] == ["system", "user", "assistant"]


def test_multi_turn_conversation_is_accepted_and_its_last_turn_is_the_response() -> None:
    turns = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"), Message("assistant", "ciao")]

    example = Example(turns, source="f:1", id="t/0")

    assert isinstance(example.messages, tuple)
    assert example.response == "ciao"
    assert len(example.prompt_messages) == 3


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(DataError, match="expected one of system, user, assistant, got 'bot'"):
        Message("bot", "hi")  # type: ignore[arg-type]


def test_blank_content_is_rejected() -> None:
    with pytest.raises(DataError, match="non-blank"):
        Message("user", "  \n")


@pytest.mark.parametrize(
    "roles",
    [
        ["user"],
        ["assistant"],
        ["user", "user"],
        ["assistant", "user"],
        ["user", "assistant", "user"],
        ["system", "assistant"],
        ["user", "system", "assistant"],
    ],
)
def test_bad_role_order_is_rejected_naming_the_source(roles: list[str]) -> None:
    messages = [Message(role, "text") for role in roles]  # type: ignore[arg-type]

    with pytest.raises(DataError, match=r"f\.jsonl:7: .*expected roles"):
        Example(messages, source="f.jsonl:7", id="t/0")
