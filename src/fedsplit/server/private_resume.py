"""A restarted server's private aggregation state from its checkpoints (arXiv 2503.12226 on FL-GLM).

``hybrid_top_fraction`` ranks tensors by the last completed *global* update (`fedsplit.aggregation.hybrid`);
a checkpoint holds only the current global parts, so the previous ones come from the checkpoint of the
round before (or the run's initial parts after round 1). Without it every tensor stays encrypted until
a round completes: more encryption than configured, never less.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from fedsplit.server.private_round import PrivateAggregator
from fedsplit.strategy.base import Strategy

__all__ = ["resume_private"]

log = logging.getLogger(__name__)


def resume_private(strategy: Strategy, directory: Path, round: int, initial: Mapping[str, Tensor],
                   current: Mapping[str, Tensor]) -> None:
    """Give a restarted ``PrivateAggregator`` the last global update: checkpoint ``round - 1`` (or ``initial``)."""
    if not isinstance(strategy, PrivateAggregator) or not strategy.top:
        return
    from fedsplit.server.checkpoint import load_checkpoint, round_dir_name

    previous: Mapping[str, Tensor] | None = initial if round == 1 else None
    path = directory / round_dir_name(round - 1)
    if round > 1 and path.is_dir():
        previous = load_checkpoint(path).global_adapters
    if previous is None:
        log.warning("hybrid_top_fraction: no checkpoint of round %d in %s; every tensor is encrypted until a "
                    "round completes", round - 1, directory)
    strategy.resume(previous, current)
