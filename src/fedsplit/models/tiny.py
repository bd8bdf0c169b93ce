"""Tiny random-weight causal LMs, one per architecture family fedsplit splits (FL-GLM, arXiv 2406.14898).

Every model has the same small shape (hidden 64, 6 layers, 4 heads, 2 KV heads where the family has
grouped-query attention, MLP 128, 256 positions, no dropout) and the byte-level tiny tokenizer, so a
test can run every architecture in well under a second. The variants keep what makes each family
different: Mistral's sliding window everywhere, Qwen2's sliding-window layers mixed with full-attention
layers, Qwen3's q/k norms, GLM's partial rotary embedding and attention bias, GPT-2's learned
positions and tied embeddings. Weights are a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GlmConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

from fedsplit.models.errors import ModelLoadError
from fedsplit.models.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

# The shared shape, in the argument names of Llama-style configs (Llama, Mistral, Qwen, GLM).
_STANDARD_SHAPE: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,  # 64 / 4; Qwen3 and GLM would otherwise default to 128
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }
)

# The same shape in GPT-2's argument names (GPT-2 has no grouped-query attention).
_GPT2_SHAPE: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": TINY_VOCAB_SIZE,
        "n_embd": 64,
        "n_layer": 6,
        "n_head": 4,
        "n_inner": 128,
        "n_positions": 256,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
        "tie_word_embeddings": True,
    }
)


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: a transformers config class and the arguments that build it."""

    config_class: type[PretrainedConfig]
    arguments: Mapping[str, Any]
    exercises: str = field(default="", compare=False)  # what this variant adds to the test matrix

    def __post_init__(self) -> None:
        if not (isinstance(self.config_class, type) and issubclass(self.config_class, PretrainedConfig)):
            raise TypeError(f"config_class: expected a transformers config class, got {self.config_class!r}")
        dropouts = {k: v for k, v in self.arguments.items() if ("dropout" in k or "pdrop" in k) and v != 0}
        if dropouts:
            raise ValueError(f"tiny models must be deterministic: expected every dropout 0, got {dropouts}")


TINY_SPECS: Mapping[str, TinySpec] = MappingProxyType(
    {
        "tiny-llama": TinySpec(LlamaConfig, _STANDARD_SHAPE, "plain RoPE + GQA, untied embeddings"),
        "tiny-qwen2": TinySpec(
            Qwen2Config,
            {**_STANDARD_SHAPE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3},
            "layers 0-2 full attention, layers 3-5 sliding window of 8",
        ),
        "tiny-qwen3": TinySpec(
            Qwen3Config, {**_STANDARD_SHAPE, "tie_word_embeddings": True}, "q/k RMS norms, tied embeddings"
        ),
        "tiny-mistral": TinySpec(MistralConfig, {**_STANDARD_SHAPE, "sliding_window": 8}, "sliding window of 8"),
        "tiny-gpt2": TinySpec(GPT2Config, _GPT2_SHAPE, "learned positions, LayerNorm, Conv1D, tied embeddings"),
        "tiny-glm": TinySpec(GlmConfig, _STANDARD_SHAPE, "partial rotary (half the head), attention bias"),
    }
)

TINY_MODELS: tuple[str, ...] = tuple(TINY_SPECS)


def tiny_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
    """The config of tiny model ``name``, with special-token ids taken from the tiny tokenizer."""
    spec = _spec(name)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    token_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return spec.config_class(**spec.arguments, **token_ids)


def build_tiny_model(name: str, *, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A freshly initialised fp32 tiny model; the same ``seed`` gives an identical state dict."""
    config = tiny_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_tiny(
    name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tiny model ``name`` and the byte-level tiny tokenizer."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(name, seed=seed, tokenizer=tokenizer)
    return model.to(dtype), tokenizer  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to loses the bound self


def _spec(name: str) -> TinySpec:
    try:
        return TINY_SPECS[name]
    except KeyError:
        raise ModelLoadError(f"unknown tiny model {name!r}; expected one of {', '.join(TINY_MODELS)}") from None
