"""Tests for fedsplit.security (mirrors src/fedsplit/security)."""

from __future__ import annotations
