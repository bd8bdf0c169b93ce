"""Embedded demo data: question/answer pairs from the Python standard library's own docstrings.

Federated demos and tests need realistic, non-IID client data that ships with Python and needs no
download. For a fixed, curated list of modules grouped into three *module families*, each public
function or class with a usable docstring becomes::

    user:      What does `json.dumps` do?          (classes: What is `collections.Counter`?)
    assistant: <first sentence of its docstring, whitespace-normalized, at most ~200 characters>

Docstrings whose first paragraph is only a signature, or whose first sentence is too short or ends in
a colon, are skipped; so are objects re-exported from ``builtins`` and objects already seen under an
earlier module. Everything is sorted, so the result is the same on every call (it can differ between
Python versions, whose docstrings differ). The only randomness is the seeded choice of the held-out
evaluation examples.

Silos are non-IID by family (the FL-GLM setting, arXiv 2406.14898, of clients with different data):
client ``c`` owns family ``c % 3``. With 3 clients, family ``i`` is client ``i``'s. With more, the
clients sharing a family split its examples into contiguous, near-equal shards (in module order, so
they mostly see different modules). With fewer, a family nobody owns goes to client ``i % num_clients``
(2 clients: client 0 has families 0 and 2; 1 client has everything).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from fedsplit.data.schema import Example

FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "text and data formats": (
            "base64", "binascii", "codecs", "configparser", "csv", "difflib", "email.utils", "fnmatch", "html",
            "json", "plistlib", "quopri", "re", "shlex", "string", "struct", "textwrap", "unicodedata",
            "urllib.parse", "xml.etree.ElementTree",
        ),
        "files and system": (
            "filecmp", "glob", "io", "os", "os.path", "pathlib", "shutil", "stat", "subprocess", "tarfile",
            "tempfile", "zipfile",
        ),
        "math, data structures and functional": (
            "bisect", "cmath", "collections", "copy", "dataclasses", "decimal", "fractions", "functools", "heapq",
            "itertools", "math", "operator", "random", "statistics",
        ),
    }
)  # fmt: skip

MAX_ANSWER_CHARS = 200
MIN_ANSWER_WORDS = 3
# "dumps(obj, ...) -> str" (dropped) or "repeat(object [,times]) -> create an iterator ..." (kept: "create ...")
_SIGNATURE = re.compile(r"^\s*[\w.]+\(.*?\)\s*(?:(?:-+>|-)\s*(?P<rest>.*))?$")
_ASSIGNMENT = re.compile(r"^\s*\w+\s*=")  # a code sample such as "csv_reader = reader(...)"
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)[.!?](?=\s|$)")  # not "e.g. x"


@dataclass(frozen=True)
class StdlibDocsSplit:
    """Training silos (one list per client) and a held-out evaluation set drawn from every family."""

    silos: list[list[Example]]
    eval: list[Example]


def first_sentence(docstring: str, name: str = "") -> str | None:
    """The first sentence of a docstring's first descriptive paragraph, or None if there is no usable one.

    Leading signature lines are dropped (keeping a description that follows an arrow), as are code
    samples and a ``name: `` prefix.
    """
    for paragraph in inspect.cleandoc(docstring).split("\n\n"):
        lines = [line.rstrip().rstrip("\\") for line in paragraph.splitlines() if line.strip()]
        if lines and _ASSIGNMENT.match(lines[0]):
            continue
        text = " ".join(" ".join(_without_signatures(lines)).split())
        if text:
            return _usable(_first_sentence_of(text.removeprefix(f"{name}: ")))
    return None


def _without_signatures(lines: list[str]) -> list[str]:
    """The lines after the leading signature lines; a description after a signature's arrow is kept
    if it has a few words ("repeat(object [,times]) -> create an iterator ...")."""
    while lines and (match := _SIGNATURE.match(lines[0])):
        rest = match["rest"] or ""
        if len(rest.split()) >= MIN_ANSWER_WORDS:
            return [rest, *lines[1:]]
        lines = lines[1:]
    return lines


def _first_sentence_of(text: str) -> str:
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def _usable(sentence: str) -> str | None:
    if len(sentence.split()) < MIN_ANSWER_WORDS or not sentence[0].isalpha() or sentence.endswith(":"):
        return None
    sentence = sentence[0].upper() + sentence[1:]
    if len(sentence) <= MAX_ANSWER_CHARS:
        return sentence
    return sentence[: MAX_ANSWER_CHARS - 3].rsplit(" ", 1)[0].rstrip(",;") + "..."


def _own_docstring(obj: object) -> str | None:
    """The object's own docstring (a class's is not inherited from its bases)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _public_objects(module_name: str) -> list[tuple[str, object]]:
    """Sorted public functions and classes of a module (its ``__all__`` when it has one)."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [name for name in dir(module) if not name.startswith("_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some attributes warn when touched (deprecations)
        objects = [(name, getattr(module, name, None)) for name in sorted(set(names))]
    return [(name, obj) for name, obj in objects if inspect.isroutine(obj) or inspect.isclass(obj)]


def _module_examples(module_name: str, seen: set[int]) -> list[Example]:
    examples = []
    for name, obj in _public_objects(module_name):
        doc = _own_docstring(obj)
        answer = first_sentence(doc, name) if doc else None
        if answer is None or id(obj) in seen or getattr(obj, "__module__", None) == "builtins":
            continue
        seen.add(id(obj))
        qualified = f"{module_name}.{name}"
        question = f"What is `{qualified}`?" if inspect.isclass(obj) else f"What does `{qualified}` do?"
        source, example_id = f"stdlib:{qualified}", f"stdlib/{module_name}/{name}"
        examples.append(Example.from_pair(question, answer, source=source, id=example_id))
    return examples


@functools.cache
def stdlib_docs_by_family() -> tuple[tuple[Example, ...], ...]:
    """All examples, one tuple per family of :data:`FAMILIES`, in module then name order."""
    seen: set[int] = set()  # an object reachable from two modules is asked about once
    return tuple(
        tuple(example for module in modules for example in _module_examples(module, seen))
        for modules in FAMILIES.values()
    )


def _hold_out(examples: Sequence[Example], fraction: float, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(train, eval): ``fraction`` of the examples (at least one if fraction > 0), chosen by ``rng``."""
    count = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    chosen = set(rng.sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]


def _shards(examples: Sequence[Example], count: int) -> list[list[Example]]:
    """``count`` contiguous, near-equal parts."""
    sizes = [len(examples) // count + (i < len(examples) % count) for i in range(count)]
    starts = itertools.accumulate(sizes, initial=0)
    return [list(examples[start : start + size]) for start, size in zip(starts, sizes, strict=False)]


def _owners(family: int, num_families: int, num_clients: int) -> list[int]:
    return [c for c in range(num_clients) if c % num_families == family] or [family % num_clients]


def stdlib_docs_silos(num_clients: int = 3, eval_fraction: float = 0.1, seed: int = 0) -> StdlibDocsSplit:
    """Non-IID client silos by module family plus a held-out eval split from every family (see module doc)."""
    if type(num_clients) is not int or num_clients < 1:
        raise ValueError(f"num_clients: expected a positive int, got {num_clients!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction: expected a number in [0, 1), got {eval_fraction!r}")
    rng = random.Random(seed)
    silos: list[list[Example]] = [[] for _ in range(num_clients)]
    held_out: list[Example] = []
    families = stdlib_docs_by_family()
    for family, examples in enumerate(families):
        train, evaluation = _hold_out(examples, eval_fraction, rng)
        held_out.extend(evaluation)
        owners = _owners(family, len(families), num_clients)
        for owner, shard in zip(owners, _shards(train, len(owners)), strict=False):
            silos[owner].extend(shard)
    if not all(silos):
        raise ValueError(f"num_clients: expected few enough clients that each gets an example, got {num_clients}")
    return StdlibDocsSplit(silos=silos, eval=held_out)
