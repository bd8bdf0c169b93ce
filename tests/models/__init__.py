"""Tests for fedsplit.models (a package so test module names cannot clash with other test folders)."""
