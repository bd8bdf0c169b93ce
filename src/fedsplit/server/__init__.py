"""The server actor: the trunk, its optimizer, and (over the network) sessions and rounds."""

from __future__ import annotations

from fedsplit.server.trunk import TrunkServer

__all__ = ["TrunkServer"]
# Only the one-trunk service is exported here, so importing it loads nothing else; import the rest
# from their modules: fedsplit.server.coordinator, .batching, .checkpoint, .shared_weights and the
# server-hierarchical package fedsplit.server.hierarchy.
