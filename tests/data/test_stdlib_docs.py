"""Tests for fedsplit.data.stdlib_docs: deterministic, non-IID silos of docstring Q/A pairs with a
held-out eval split from every family."""

from __future__ import annotations

import re

import pytest

from fedsplit.data import FAMILIES, Example, stdlib_docs_silos
from fedsplit.data.stdlib_docs import MAX_ANSWER_CHARS, first_sentence, stdlib_docs_by_family

QUESTION = re.compile(r"^What (does `[\w.]+` do|is `[\w.]+`)\?$")


def _module(example: Example) -> str:
    return example.id.split("/")[1]  # ids are stdlib/<module>/<name>


def _ids(examples: list[Example]) -> set[str]:
    return {example.id for example in examples}


def test_two_calls_give_the_same_split() -> None:
    first = stdlib_docs_silos()
    stdlib_docs_by_family.cache_clear()  # rebuild from the docstrings, not from the cache

    second = stdlib_docs_silos()

    assert first == second


def test_three_clients_get_one_family_each_and_disjoint_modules() -> None:
    split = stdlib_docs_silos(num_clients=3)

    modules = [{_module(e) for e in silo} for silo in split.silos]
    assert [m <= set(family) for m, family in zip(modules, FAMILIES.values(), strict=False)] == [True, True, True]
    assert not (modules[0] & modules[1] or modules[0] & modules[2] or modules[1] & modules[2])


def test_eval_is_disjoint_from_the_silos_and_drawn_from_every_family() -> None:
    split = stdlib_docs_silos(eval_fraction=0.1)

    in_silos = set().union(*(_ids(silo) for silo in split.silos))
    eval_modules = {_module(e) for e in split.eval}
    assert not _ids(split.eval) & in_silos
    assert all(eval_modules & set(family) for family in FAMILIES.values())
    assert 0.08 < len(split.eval) / (len(split.eval) + len(in_silos)) < 0.12


def test_the_seed_changes_only_which_examples_are_held_out() -> None:
    a, b = stdlib_docs_silos(seed=0), stdlib_docs_silos(seed=1)

    everything = _ids(a.eval) | set().union(*(_ids(s) for s in a.silos))
    assert _ids(a.eval) != _ids(b.eval)
    assert everything == _ids(b.eval) | set().union(*(_ids(s) for s in b.silos))


def test_a_few_hundred_well_formed_question_answer_pairs() -> None:
    examples = [e for family in stdlib_docs_by_family() for e in family]

    assert 300 <= len(examples) <= 1500
    assert len(_ids(examples)) == len(examples)
    assert all(QUESTION.match(e.messages[0].content) for e in examples)
    assert all(len(e.response) <= MAX_ANSWER_CHARS and "\n" not in e.response for e in examples)
    dumps = next(e for e in examples if e.id == "stdlib/json/dumps")
    assert dumps.messages[0].content == "What does `json.dumps` do?"
    assert dumps.response.startswith("Serialize")


def test_two_clients_client_zero_gets_the_first_and_last_family() -> None:
    split = stdlib_docs_silos(num_clients=2)

    families = list(FAMILIES.values())
    assert {_module(e) for e in split.silos[0]} <= set(families[0]) | set(families[2])
    assert {_module(e) for e in split.silos[1]} <= set(families[1])


def test_six_clients_share_families_in_pairs_and_lose_nothing() -> None:
    three, six = stdlib_docs_silos(num_clients=3), stdlib_docs_silos(num_clients=6)

    assert [_ids(six.silos[i]) | _ids(six.silos[i + 3]) for i in range(3)] == [_ids(s) for s in three.silos]
    assert all(six.silos) and not _ids(six.silos[0]) & _ids(six.silos[3])


def test_one_client_gets_every_training_example() -> None:
    one, three = stdlib_docs_silos(num_clients=1), stdlib_docs_silos(num_clients=3)

    assert _ids(one.silos[0]) == set().union(*(_ids(s) for s in three.silos))


def test_no_eval_fraction_means_no_eval_examples() -> None:
    assert stdlib_docs_silos(eval_fraction=0).eval == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients: expected a positive int, got 0"),
        ({"num_clients": 1000}, "num_clients: expected few enough clients"),
        ({"eval_fraction": 1.0}, r"eval_fraction: expected a number in \[0, 1\), got 1.0"),
        ({"eval_fraction": -0.1}, "eval_fraction"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stdlib_docs_silos(**kwargs)


def test_building_the_silos_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    stdlib_docs_by_family.cache_clear()

    stdlib_docs_silos()

    assert capsys.readouterr() == ("", "")


# --- first_sentence ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        ("Return the square root of x.\n\nMore detail.", "Return the square root of x."),
        ("sqrt(x)\n\nReturn the square root of x.", "Return the square root of x."),
        ("f(a, b) -> int\nCompute a sum. Then more.", "Compute a sum."),
        ("repeat(object [,times]) -> create an iterator which\nrepeats it.", "Create an iterator which repeats it."),
        ("Split it, e.g. on commas. Then more.", "Split it, e.g. on commas."),
        ("    Indented   text\n    over   two lines.", "Indented text over two lines."),
        ("x = f(y)\nfor z in x: pass\n\nThe real description.", "The real description."),
        ("Match(a, b, size)", None),
        ("Too short.", None),
        ("Has these properties:\n\nmsg: the message", None),
    ],
)
def test_first_sentence(docstring: str, expected: str | None) -> None:
    assert first_sentence(docstring) == expected


def test_first_sentence_drops_a_name_prefix() -> None:
    assert first_sentence("stat_result: Result from stat or lstat.", "stat_result") == "Result from stat or lstat."


def test_first_sentence_caps_long_answers_at_a_word_boundary() -> None:
    sentence = first_sentence("Word " * 100 + "end.")

    assert sentence is not None and len(sentence) <= MAX_ANSWER_CHARS
    assert sentence.endswith("Word...")
