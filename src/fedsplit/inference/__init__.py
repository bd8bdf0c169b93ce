"""Split generation: each party (head, trunk, tail) keeps its own KV cache (FL-GLM, arXiv 2406.14898).

See :mod:`fedsplit.inference.generate` for the flow across the cut and ``docs/inference.md``.
"""

from __future__ import annotations

from fedsplit.inference.generate import (
    Generation,
    GenerationError,
    LocalTrunk,
    SplitGenerator,
    TrunkLink,
    encode_prompt,
    generate_ids,
    iter_tokens,
)
from fedsplit.inference.sampling import SamplingSettings, filter_logits, next_tokens

__all__ = ["Generation", "GenerationError", "LocalTrunk", "SamplingSettings", "SplitGenerator", "TrunkLink",
           "encode_prompt", "filter_logits", "generate_ids", "iter_tokens", "next_tokens"]
