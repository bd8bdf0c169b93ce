"""The error every model loader raises (FL-GLM, arXiv 2406.14898: the model the parties split).

Its own module so that the loaders import it without importing the package that lazily imports them.
"""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model or its tokenizer could not be loaded; the message says what to do instead."""
