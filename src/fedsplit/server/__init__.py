"""The server actor: the trunk, its optimizer, and (over the network) sessions and rounds."""

from __future__ import annotations

from fedsplit.server.trunk import TrunkServer

__all__ = ["TrunkServer"]
# The coordinator, the batching server and checkpoints import torch-heavy modules: import them from
# their modules (fedsplit.server.coordinator, .batching, .checkpoint).
