"""The client actor: head, tail, local data and labels."""

from __future__ import annotations

from fedsplit.client.split_client import SplitClient
from fedsplit.train.optim import StepResult

__all__ = ["SplitClient", "StepResult"]
