"""Greedy generation of an unsplit PEFT P-tuning v2 model (FL-GLM, arXiv 2406.14898: the prefix-tuned
model a federation's ``adapters/prefix`` or the centralized prefix baseline loads; docs/ptuning.md).

PEFT 0.21's ``PeftModelForCausalLM.generate`` puts the prefixes in ``model_kwargs["past_key_values"]``,
but transformers 5.24's ``generate`` passes its own cache as ``cache=``, and the model then ignores
``past_key_values`` ("Both `past_key_values` and `cache` are set ... ignoring"): the answers are the
base model's (measured on tiny-llama: the same tokens as without the adapter). The forward pass is not
affected (scores and losses are right).

:func:`generate` runs the base model's ``generate`` on the cache PEFT would have used: a ``DynamicCache``
pre-filled with the prefixes (``PeftModel.get_prompt``), ``P`` placeholder tokens in front of the
prompt for the cached positions (never fed to the model), ``P`` leading ones on the mask, so the real
tokens' positions start at ``P`` as in PEFT's forward and in the split parts. Any other model goes to
its own ``generate``. Tested: the same tokens as greedy decoding through the split parts.
"""

from __future__ import annotations

from typing import Any

import torch


def prefix_tokens(model: Any) -> int:
    """``P`` of a PEFT prefix-tuning model, 0 for any other model."""
    config: Any = getattr(model, "active_peft_config", None)
    if config is None or getattr(config, "peft_type", None) != "PREFIX_TUNING":  # PeftType is a str enum
        return 0
    return int(config.num_virtual_tokens)


def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model.generate(input_ids=..., attention_mask=..., **kwargs)``: ``(B, T + new)``, the prompt included;
    a PEFT prefix-tuning model generates with its prefixes in the cache (see the module docstring)."""
    width = prefix_tokens(model)
    if not width:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # type: ignore[no-any-return]
    batch = input_ids.shape[0]
    cache = model.get_prompt(batch)  # DynamicCache, P positions per layer
    placeholders = input_ids[:, :1].expand(-1, width)  # (B, P): stand for the cached prefix positions
    ids = torch.cat([placeholders, input_ids], dim=1)  # (B, P + T)
    mask = torch.cat([attention_mask.new_ones(batch, width), attention_mask], dim=1)  # (B, P + T)
    out = model.get_base_model().generate(input_ids=ids, attention_mask=mask, cache=cache, **kwargs)
    return out[:, width:]  # (B, T + new)
