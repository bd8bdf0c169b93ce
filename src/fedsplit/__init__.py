"""fedsplit: federated split fine-tuning of large language models.

Implements FL-GLM (Peng et al., "FL-GLM: Federated Split Learning for Large Language Models",
arXiv 2406.14898): each client keeps the head and the tail of a causal LM, the server runs the
trunk, and only hidden states and their gradients cross the cuts.

Nothing heavy happens at import: the public functions below import torch and transformers lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["load_model", "split_model", "__version__"]

if TYPE_CHECKING:
    from fedsplit.models import load_model
    from fedsplit.split import split_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from fedsplit.models import load_model

        return load_model
    if name == "split_model":
        from fedsplit.split import split_model

        return split_model
    raise AttributeError(f"module 'fedsplit' has no attribute {name!r}")
