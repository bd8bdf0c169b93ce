"""The client actor: head, tail, local data and labels."""

from __future__ import annotations

from fedsplit.client.split_client import SplitClient, StepResult

__all__ = ["SplitClient", "StepResult"]
