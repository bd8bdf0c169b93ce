"""Training: shared optimization settings, the centralized baseline and the run loops."""

from __future__ import annotations

from fedsplit.train.config import TrainConfig

__all__ = ["TrainConfig"]
