"""Tests for fedsplit.data (a package so its module names cannot clash with other test folders)."""

from __future__ import annotations
