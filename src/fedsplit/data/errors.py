"""Errors raised while reading, harmonizing and tokenizing training data.

Every message names where the bad input is (``file:line``, plus the field when there is one) so
that a user can open the file at that line and fix it.
"""

from __future__ import annotations


def locate(path: str, line: int | None = None, field: str | None = None) -> str:
    """``path:line: field 'name'`` with the parts that are known (used as a message prefix)."""
    where = path if line is None else f"{path}:{line}"
    return where if field is None else f"{where}: field {field!r}"


class DataError(ValueError):
    """Bad input data: the message says which file, line/row and field, and what was expected."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.path, self.line, self.field = path, line, field
        prefix = "" if path is None else locate(path, line, field) + ": "
        super().__init__(prefix + message)


class DataUnavailableError(DataError):
    """A data source cannot be reached (optional package missing, hub unreachable, file absent)."""
