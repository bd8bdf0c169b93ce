"""Per-architecture facts for cutting a Hugging Face causal LM (STYLE rule 2: a table, not a fork).

Every supported architecture is described by where its modules live inside the
``*ForCausalLM`` object and by which 4-D attention mask each block uses. The split engine
(:mod:`fedsplit.split.parts`) reads only this table; it never copies modelling code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

FULL = "full_attention"
SLIDING = "sliding_attention"


def _always_full(config: Any, layer: int) -> str:
    return FULL


def _mistral_window(config: Any, layer: int) -> str:
    # Mistral applies its sliding window to every block when ``sliding_window`` is set.
    return FULL if getattr(config, "sliding_window", None) is None else SLIDING


def _by_layer_types(config: Any, layer: int) -> str:
    # Qwen2/Qwen3 list one attention kind per block in ``config.layer_types``.
    layer_types = getattr(config, "layer_types", None)
    return FULL if layer_types is None else layer_types[layer]


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its parts, as attribute paths from the ``*ForCausalLM`` root."""

    embed: str
    layers: str
    norm: str
    lm_head: str = "lm_head"
    rotary: str | None = None  # rotary embedding module, rebuilt on each side of a cut
    position_embed: str | None = None  # learned absolute positions (GPT-2), head only
    embed_dropout: str | None = None  # dropout after the embeddings (GPT-2), head only
    layer_type: Callable[[Any, int], str] = _always_full
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    fan_in_fan_out: bool = False  # GPT-2 stores Conv1D weights transposed


class _LlamaLike(TypedDict):
    """The :class:`ArchSpec` fields shared by the Llama-like rows (typed, so ``**`` is checked)."""

    embed: str
    layers: str
    norm: str
    rotary: str


_LLAMA_LIKE: _LlamaLike = {
    "embed": "model.embed_tokens",
    "layers": "model.layers",
    "norm": "model.norm",
    "rotary": "model.rotary_emb",
}

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(**_LLAMA_LIKE),
    "mistral": ArchSpec(**_LLAMA_LIKE, layer_type=_mistral_window),
    "qwen2": ArchSpec(**_LLAMA_LIKE, layer_type=_by_layer_types),
    "qwen3": ArchSpec(**_LLAMA_LIKE, layer_type=_by_layer_types),
    "glm": ArchSpec(**_LLAMA_LIKE),
    "gpt2": ArchSpec(
        embed="transformer.wte",
        layers="transformer.h",
        norm="transformer.ln_f",
        position_embed="transformer.wpe",
        embed_dropout="transformer.drop",
        lora_targets=("c_attn",),
        fan_in_fan_out=True,
    ),
}


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHITECTURES`."""


def arch_spec(model_type: str) -> ArchSpec:
    """Return the table entry for ``model_type`` or say which types are supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"cannot split model_type {model_type!r}: supported architectures are {supported}. "
            "Add an ArchSpec entry to fedsplit.split.arch.ARCHITECTURES to support it."
        ) from None
