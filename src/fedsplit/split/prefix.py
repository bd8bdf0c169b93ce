"""P-tuning v2 (deep prefix tuning) on each split part (FL-GLM, arXiv 2406.14898, Sec. 3; Liu et al., P-tuning v2).

Every decoder block ``l`` gets ``P`` trainable key/value vectors per KV head, prepended to the keys and
values its attention sees, exactly as PEFT's ``PrefixTuningConfig(prefix_projection=False)`` feeds
them through ``past_key_values``. Each part owns the prefixes of its own blocks::

    head  (client): prefixes of blocks [0, p)          trunk (server): [p, N - q)          tail (client): [N - q, N)

so nothing but hidden states and their gradients crosses a cut: the server's prefixes live and train
on the server (FL-GLM's code instead ships the server layers' prefixes to the client every step).

The prefixes are ``nn.Parameter``s of the part, in a submodule named :data:`PREFIX_MODULE`
(``prefix_tuning.key.3``: ``(num_kv_heads, P, head_dim)``), so they sit in the part's state dict next
to LoRA weights and the existing adapter payloads (:func:`fedsplit.adapters.adapter_state_dict`, the
FedAvg of the client parts) carry them.

How PEFT runs prefix tuning (peft 0.21, transformers 5; checked in ``PeftModelForCausalLM.forward``):
the attention mask gets ``P`` leading ones, the cache is pre-filled with the prefixes (not rotated), and
the real tokens' position ids are offset by ``P`` (given position ids get ``+ P``; without them the
model counts from the cache length ``P``). Each part does the same with its own ``DynamicCache``:
it receives the un-offset position ids that cross the cut and adds ``P`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsplit.split.parts import SplitPart

PREFIX_MODULE = "prefix_tuning"
# Prefixes start from N(0, 0.02^2), not PEFT's N(0, 1) (its PrefixEncoder is an nn.Embedding): near-zero
# keys and values leave the pretrained model almost as it was (SmolLM2 on the stdlib-docs held-out set:
# 4.34 at the start against 4.34 zero-shot; 8.95 with N(0, 1)), and a prefix federation then trains
# from there (docs/ptuning.md, "Initialization"). Not zero: equal prefixes would get equal gradients.
PREFIX_INIT_STD = 0.02


class PrefixError(ValueError):
    """Prefix tuning cannot be applied to, or loaded into, this part."""


def kv_shape(config: Any) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of the model's attention (PEFT's ``num_attention_heads``, ``token_dim``)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return kv_heads, int(head_dim)


class PartPrefix(nn.Module):
    """The trainable prefix keys and values of one part's blocks, indexed by global layer number."""

    def __init__(self, layers: Sequence[int], num_virtual_tokens: int, kv_heads: int, head_dim: int,
                 generator: torch.Generator | None = None, init_std: float = PREFIX_INIT_STD) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise PrefixError(f"num_virtual_tokens: expected >= 1, got {num_virtual_tokens!r}")
        if not init_std >= 0.0:
            raise PrefixError(f"init_std: expected >= 0, got {init_std!r}")
        self.num_virtual_tokens = num_virtual_tokens
        shape = (kv_heads, num_virtual_tokens, head_dim)

        def draw() -> nn.Parameter:  # N(0, init_std^2)
            return nn.Parameter(torch.randn(shape, generator=generator) * init_std)

        self.key = nn.ParameterDict({str(i): draw() for i in layers})
        self.value = nn.ParameterDict({str(i): draw() for i in layers})

    def fill(self, cache: Any, layers: Sequence[int], batch: int, dtype: torch.dtype) -> None:
        """Pre-fill ``cache`` with the prefixes of ``layers``, each expanded to ``(B, kv_heads, P, head_dim)``."""
        for layer in layers:
            key = self.key[str(layer)].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
            value = self.value[str(layer)].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(key, value, layer)

    def forward(self, part: SplitPart, hidden: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """``part.run_blocks`` with these prefixes (``SplitPart.run_blocks`` hands over to this)."""
        return run_prefixed(part, hidden, attention_mask, position_ids)


def part_prefix(part: nn.Module) -> PartPrefix | None:
    """The part's :class:`PartPrefix`, or None when it has no prefixes."""
    module = part._modules.get(PREFIX_MODULE)
    return module if isinstance(module, PartPrefix) else None


def add_prefix(part: SplitPart, num_virtual_tokens: int, *, seed: int = 0,
               init_std: float = PREFIX_INIT_STD) -> PartPrefix:
    """Freeze ``part`` and give each of its blocks ``num_virtual_tokens`` trainable prefix keys/values,
    drawn from N(0, ``init_std``^2) (:data:`PREFIX_INIT_STD`; 1.0 is PEFT's; ``[method] init_std``).

    Initialization is deterministic in ``seed`` and does not touch the global RNG. Only rotary
    architectures (the position is applied inside attention) are supported.
    """
    if part.spec.position_embed:
        raise PrefixError(f"prefix tuning needs a rotary architecture; {part.config.model_type} adds absolute "
                          "position embeddings in the head")
    if part_prefix(part) is not None:
        raise PrefixError(f"the {type(part).__name__.lower()} already has prefixes")
    kv_heads, head_dim = kv_shape(part.config)
    generator = torch.Generator().manual_seed(seed)
    prefix = PartPrefix(part.layer_indices, num_virtual_tokens, kv_heads, head_dim, generator, init_std)
    dtype = next(part.parameters()).dtype
    part.requires_grad_(False)
    part.add_module(PREFIX_MODULE, prefix.to(dtype))
    for param in prefix.parameters():
        param.requires_grad_(True)
    return prefix


def add_part_prefixes(parts: Sequence[SplitPart], num_virtual_tokens: int, *, seed: int = 0,
                      init_std: float = PREFIX_INIT_STD) -> None:
    """Prefixes on head, trunk and tail; part ``i`` is initialized with ``seed + i`` (N(0, ``init_std``^2)).

    The parts share their blocks with the unsplit model, but the prefixes live on the parts: the
    unsplit reference is :func:`peft_prefix_table` loaded into a PEFT prefix-tuning model.
    """
    for index, part in enumerate(parts):
        add_prefix(part, num_virtual_tokens, seed=seed + index, init_std=init_std)


def run_prefixed(part: SplitPart, hidden: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """``part.run_blocks`` with the prefixes prepended to every block's keys and values (PEFT's way)."""
    from transformers import DynamicCache

    prefix = part_prefix(part)
    if prefix is None:
        raise PrefixError(f"the {type(part).__name__.lower()} has no prefixes: call add_prefix first")

    batch, width = hidden.shape[0], prefix.num_virtual_tokens
    cache = DynamicCache(config=part.config)
    prefix.fill(cache, part.layer_indices, batch, hidden.dtype)
    ones = torch.ones(batch, width, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask = torch.cat([ones, attention_mask], dim=1)  # (B, P + T)
    positions = position_ids + width  # PEFT offsets the real tokens' positions by P
    masks = part.cache_masks(cache, hidden, full_mask, positions)
    return part.run_layers(hidden, masks, positions, cache=cache)  # (B, T, H)


# -- the PEFT prefix-tuning layout (unsplit reference, export) ----------------------------------------
def peft_prefix_config(num_virtual_tokens: int) -> Any:  # peft.PrefixTuningConfig
    """PEFT's P-tuning v2 config: deep prefixes, no reparametrization (the model's dims are filled in by PEFT)."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prefix_projection=False)


def peft_prefix_table(parts: Sequence[SplitPart], *, grad: bool = False) -> torch.Tensor:
    """The parts' prefixes as PEFT's ``prompt_embeddings`` table ``(P, num_layers * 2 * kv_heads * head_dim)``
    (``grad``: their gradients, laid out the same way).

    PEFT views the table as ``(P, num_layers * 2, kv_heads, head_dim)``: row ``2 l`` is block ``l``'s key,
    ``2 l + 1`` its value.
    """
    columns = []
    for part in sorted(parts, key=lambda p: p.start):
        prefix = part_prefix(part)
        if prefix is None:
            raise PrefixError(f"the {type(part).__name__.lower()} has no prefixes: call add_prefix first")
        for layer in part.layer_indices:
            for table in (prefix.key, prefix.value):
                param = table[str(layer)]
                value = param.grad if grad else param.detach()
                if value is None:
                    raise PrefixError(f"prefix of block {layer} has no gradient")
                columns.append(value.permute(1, 0, 2).flatten(1))  # (P, kv_heads * head_dim)
    return torch.cat(columns, dim=1)


def load_peft_prefix_table(parts: Sequence[SplitPart], table: torch.Tensor) -> None:
    """Inverse of :func:`peft_prefix_table`: copy a PEFT ``prompt_embeddings`` table into the parts."""
    first = part_prefix(parts[0])
    if first is None:
        raise PrefixError("the parts have no prefixes: call add_part_prefixes first")
    kv_heads, width, head_dim = next(iter(first.key.values())).shape
    layers = sum(len(part.layer_indices) for part in parts)
    expected = (width, layers * 2 * kv_heads * head_dim)
    if tuple(table.shape) != expected:
        raise PrefixError(f"prefix table: expected shape {expected}, got {tuple(table.shape)}")
    for part in parts:
        if part_prefix(part) is None:
            raise PrefixError(f"the {type(part).__name__.lower()} has no prefixes")
    _copy_table(parts, table, layers)


def _copy_table(parts: Sequence[SplitPart], table: torch.Tensor, layers: int) -> None:
    """Each part's blocks' rows of a PEFT ``prompt_embeddings`` table of ``layers`` blocks into its prefixes
    (a part without prefixes gets them, frozen, as :func:`add_prefix`)."""
    kv_heads, head_dim = kv_shape(parts[0].config)
    width = int(table.shape[0])
    grid = table.view(width, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2L, kv_heads, P, head_dim)
    _set_prefixes(parts, width, {f"{which}.{layer}": grid[2 * layer + i] for part in parts
                                 for layer in part.layer_indices for i, which in enumerate(("key", "value"))})


def _set_prefixes(parts: Sequence[SplitPart], width: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (``key.<block>`` / ``value.<block>``, each ``(kv_heads, P, head_dim)``) into the parts'
    prefixes (a part without prefixes gets ``width`` of them, frozen, as :func:`add_prefix`)."""
    for part in parts:
        prefix = part_prefix(part) or add_prefix(part, width)
        with torch.no_grad():
            for layer in part.layer_indices:
                prefix.key[str(layer)].copy_(tensors[f"key.{layer}"])
                prefix.value[str(layer)].copy_(tensors[f"value.{layer}"])


def save_prefix_adapter(parts: Sequence[SplitPart], directory: str | Path, *, base_model: str | None = None) -> Path:
    """One PEFT prefix-tuning adapter for the unsplit model from the prefixes of all parts
    (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's ``prompt_embeddings``): what
    ``peft.PeftModel.from_pretrained(model, directory)`` loads. Needs the server's trunk and a client's
    head and tail."""
    from safetensors.torch import save_file

    table = peft_prefix_table(parts).contiguous()
    first = part_prefix(parts[0])
    if first is None:
        raise PrefixError("the parts have no prefixes: call add_part_prefixes first")
    kv_heads, width, head_dim = next(iter(first.key.values())).shape
    config = peft_prefix_config(width)
    config.num_layers = sum(len(part.layer_indices) for part in parts)
    config.token_dim = config.encoder_hidden_size = kv_heads * head_dim
    config.num_attention_heads = kv_heads
    config.num_transformer_submodules = 1
    config.base_model_name_or_path = base_model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({"prompt_embeddings": table}, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def load_prefix_adapter(parts: Sequence[SplitPart], directory: str | Path) -> int:
    """Inverse of :func:`save_prefix_adapter` for any of the parts: each gets the prefixes of its own blocks
    from the adapter's table (a client passes head and tail only; a server its trunk). Parts without
    prefixes get them (frozen part, as :func:`add_prefix`). Returns ``P``.

    Reads PEFT's ``PrefixTuningConfig(prefix_projection=False)`` adapters (ours, or PEFT's own); the
    tensors are read with safetensors (no pickle).
    """
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixError(f"{directory}: expected a PEFT prefix-tuning adapter (peft_type PREFIX_TUNING), "
                          f"got {config.get('peft_type')!r}")
    if config.get("prefix_projection"):
        raise PrefixError(f"{directory}: prefix_projection = true (an MLP reparametrization of the prefixes) "
                          "is not supported; fedsplit trains and saves them with prefix_projection = false")
    width, layers = int(config["num_virtual_tokens"]), int(config["num_layers"])
    table = load_file(str(directory / "adapter_model.safetensors"))["prompt_embeddings"]
    for part in parts:  # check everything before touching any part
        kv_heads, head_dim = kv_shape(part.config)
        expected = (width, layers * 2 * kv_heads * head_dim)
        if tuple(table.shape) != expected or part.stop > layers:
            raise PrefixError(f"{directory}: expected a prefix table of shape {expected} covering block "
                              f"{part.stop - 1}, got {tuple(table.shape)} for {layers} blocks")
        prefix = part_prefix(part)
        if prefix is not None and prefix.num_virtual_tokens != width:
            raise PrefixError(f"{directory}: {width} virtual tokens; the {type(part).__name__.lower()} has "
                              f"{prefix.num_virtual_tokens}")
    _copy_table(parts, table, layers)
    return width


# -- one organisation's copy: the prefixes of some parts only ---------------------------------------------
PART_PREFIXES = "prefix_parts.json"  # + prefix_parts.safetensors: what a client keeps of a prefix run
PART_PREFIXES_FORMAT = "fedsplit-part-prefixes/1"


def save_part_prefixes(parts: Sequence[SplitPart], directory: str | Path, *, base_model: str | None = None) -> Path:
    """The prefixes of ``parts`` alone (a client's head and tail): ``prefix_parts.safetensors`` holds
    ``key.<block>`` / ``value.<block>`` ``(kv_heads, P, head_dim)`` per block, ``prefix_parts.json`` which
    blocks, ``P`` and the base model. Not a PEFT adapter: PEFT's prefix table must cover every block, and a
    client does not hold the trunk's (the server's ``adapters/prefix`` does, :func:`save_prefix_adapter`)."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    width = None
    for part in parts:
        prefix = part_prefix(part)
        if prefix is None:
            raise PrefixError(f"the {type(part).__name__.lower()} has no prefixes: call add_prefix first")
        width = prefix.num_virtual_tokens
        for layer in part.layer_indices:
            for which in ("key", "value"):
                tensors[f"{which}.{layer}"] = getattr(prefix, which)[str(layer)].detach().contiguous()
    if width is None:
        raise PrefixError("no parts given: nothing to save")
    kv_heads, head_dim = kv_shape(parts[0].config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "prefix_parts.safetensors"), metadata={"format": "pt"})
    layers = sorted(layer for part in parts for layer in part.layer_indices)
    (directory / PART_PREFIXES).write_text(json.dumps(
        {"format": PART_PREFIXES_FORMAT, "base_model_name_or_path": base_model, "num_virtual_tokens": width,
         "layers": layers, "num_key_value_heads": kv_heads, "head_dim": head_dim}, indent=2) + "\n")
    return directory


def load_part_prefixes(parts: Sequence[SplitPart], directory: str | Path) -> int:
    """Inverse of :func:`save_part_prefixes` into ``parts`` (which must be among the saved ones); parts
    without prefixes get them, frozen, as :func:`add_prefix`. Checks everything before touching any part.
    Returns ``P``. Tensors are read with safetensors (no pickle)."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / PART_PREFIXES).read_text())
    if config.get("format") != PART_PREFIXES_FORMAT:
        raise PrefixError(f"{directory / PART_PREFIXES}: expected format {PART_PREFIXES_FORMAT!r}, "
                          f"got {config.get('format')!r}")
    width = int(config["num_virtual_tokens"])
    tensors = load_file(str(directory / "prefix_parts.safetensors"))
    for part in parts:
        name = type(part).__name__.lower()
        missing = [layer for layer in part.layer_indices if f"key.{layer}" not in tensors
                   or f"value.{layer}" not in tensors]
        if missing:
            raise PrefixError(f"{directory}: holds the prefixes of blocks {config.get('layers')}; the {name} needs "
                              f"blocks {list(part.layer_indices)} (missing {missing})")
        kv_heads, head_dim = kv_shape(part.config)
        for layer in part.layer_indices:
            for which in ("key", "value"):
                found = tuple(tensors[f"{which}.{layer}"].shape)
                if found != (kv_heads, width, head_dim):
                    raise PrefixError(f"{directory}: {which}.{layer}: expected shape "
                                      f"{(kv_heads, width, head_dim)}, got {found}")
        prefix = part_prefix(part)
        if prefix is not None and prefix.num_virtual_tokens != width:
            raise PrefixError(f"{directory}: {width} virtual tokens; the {name} has {prefix.num_virtual_tokens}")
    _set_prefixes(parts, width, tensors)
    return width


# -- bytes per training step (docs/ptuning.md) -----------------------------------------------------------
def cut_bytes_per_step(batch: int, seq: int, hidden: int, bytes_per_value: int = 4) -> int:
    """What crosses the cuts in one split step, here: hidden states (B, T, H) forward at cut 1 and cut 2,
    their gradients backward at both (framing, the 2-D mask and the position ids not counted)."""
    return 4 * batch * seq * hidden * bytes_per_value


def flglm_prefix_bytes_per_step(trunk_layers: int, num_virtual_tokens: int, kv_heads: int, head_dim: int,
                                bytes_per_value: int = 4) -> int:
    """What FL-GLM's design ships on top of the cut tensors every step: the server layers' prefix keys and
    values to the client, and their gradients back (``2 directions x layers x (K, V) x P x kv_heads x head_dim``)."""
    return 2 * trunk_layers * 2 * num_virtual_tokens * kv_heads * head_dim * bytes_per_value
