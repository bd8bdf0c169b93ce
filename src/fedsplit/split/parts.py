"""Cut a causal LM into head / trunk / tail (FL-GLM, arXiv 2406.14898, Sec. 3.1).

head  = embeddings + blocks [0, p)              : client
trunk = blocks [p, N - q)                        : server
tail  = blocks [N - q, N) + final norm + LM head : client

Each part is a plain ``nn.Module`` whose submodules keep the names they have in the unsplit
model (``model.layers.3.self_attn.q_proj`` stays ``model.layers.3.self_attn.q_proj``), so a
part's state dict (and its LoRA adapter) is a subset of the unsplit model's, key for key.

Only plain tensors cross a cut: hidden states ``(B, T, H)``, the 2-D padding mask ``(B, T)``
and position ids ``(B, T)``. Each side rebuilds its own 4-D attention mask and rotary
embeddings from them with the model's own functions (FedSEA-LLaMA's attention-mask
compression: the 4-D mask never travels).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from fedsplit.split.arch import FULL, SLIDING, ArchSpec, arch_spec


class SplitError(ValueError):
    """The requested cut is impossible for this model."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left and right padding give the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` below ``root``, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, nn.Module())
        node = node.get_submodule(name)
    node.add_module(leaf, module)


def _build_masks(
    config: Any, kinds: set[str], hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> dict[str, Any]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    builders = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
    no_cache = {_cache_argument(create_causal_mask): None}  # renamed past_key_values -> cache in transformers 5.2x
    return {
        kind: builders[kind](
            config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, **no_cache
        )
        for kind in kinds
    }


def _blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The model's decoder blocks, found at the table's ``layers`` path."""
    layers = model.get_submodule(spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise SplitError(f"expected {spec.layers} to be an nn.ModuleList of blocks, got {type(layers).__name__}")
    return layers


def _spec(model: nn.Module) -> ArchSpec:
    config: Any = model.config  # a Hugging Face PretrainedConfig (nn.Module types attributes as Tensor | Module)
    return arch_spec(config.model_type)


@functools.cache
def _cache_argument(builder: Any) -> str:
    return "cache" if "cache" in inspect.signature(builder).parameters else "past_key_values"


@functools.cache
def _takes_layer_idx(builder: Any) -> bool:
    return "layer_idx" in inspect.signature(builder).parameters


class SplitPart(nn.Module):
    """Shared machinery: a contiguous run of decoder blocks and how to call them."""

    def __init__(self, model: nn.Module, spec: ArchSpec, start: int, stop: int, extras: tuple[str, ...]) -> None:
        super().__init__()
        self.config: Any = model.config  # a Hugging Face PretrainedConfig
        self.spec = spec
        self.start, self.stop = start, stop
        layers = _blocks(model, spec)
        for index in range(start, stop):
            _attach(self, f"{spec.layers}.{index}", layers[index])
        for path in extras:
            _attach(self, path, model.get_submodule(path))
        self._blocks = [layers[index] for index in range(start, stop)]
        self._kinds = [spec.layer_type(self.config, index) for index in range(start, stop)]
        # Rotary embeddings hold no trained weights, only buffers; every part computes its own.
        self._rotary = model.get_submodule(spec.rotary) if spec.rotary else None

    @property
    def layer_indices(self) -> range:
        return range(self.start, self.stop)

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        prefix = self._modules.get("prefix_tuning")  # P-tuning v2 (fedsplit.split.prefix.PartPrefix) runs the blocks
        if prefix is not None:
            prefixed: torch.Tensor = prefix(self, hidden, attention_mask, position_ids)
            return prefixed
        masks = _build_masks(self.config, set(self._kinds), hidden, attention_mask, position_ids)
        return self.run_layers(hidden, masks, position_ids)

    def run_layers(
        self, hidden: torch.Tensor, masks: dict[str, Any], position_ids: torch.Tensor, cache: Any = None
    ) -> torch.Tensor:
        """The blocks over ``hidden`` (B, T, H) with a 4-D mask per attention kind; ``cache`` (a
        transformers ``Cache``, e.g. generation's or the P-tuning prefixes') is read and extended."""
        extra: dict[str, Any] = {"position_ids": position_ids}
        if cache is not None:
            extra.update({"use_cache": True, _cache_argument(type(self._blocks[0]).forward): cache})
        if self._rotary is not None:
            extra["position_embeddings"] = self._rotary(hidden, position_ids)  # (cos, sin), each (B, T, d)
        for block, kind in zip(self._blocks, self._kinds, strict=True):
            out = block(hidden, attention_mask=masks[kind], **extra)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        return hidden

    def cache_masks(
        self, cache: Any, hidden: torch.Tensor, full_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, Any]:
        """The 4-D mask of each attention kind over what ``cache`` holds plus ``hidden``'s positions.

        ``full_mask`` is the 2-D mask of both ``(B, L + T)``. The cache is indexed by global layer
        numbers and a part fills only its own layers, so each mask is sized against the part's
        first block of that kind (transformers' builders take its ``layer_idx``).
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
        first = {kind: self.start + i for i, kind in reversed(list(enumerate(self._kinds)))}
        if not all(_takes_layer_idx(builders[kind]) for kind in first):
            raise SplitError("a part with a cache needs transformers' mask builders with a layer_idx argument (>= 5.2)")
        return {kind: builders[kind](config=self.config, inputs_embeds=hidden, attention_mask=full_mask,
                                     position_ids=position_ids, layer_idx=layer,
                                     **{_cache_argument(create_causal_mask): cache})
                for kind, layer in first.items()}


class Head(SplitPart):
    """Embeddings + the first ``p`` blocks. Runs on the client; sees the tokens."""

    def __init__(self, model: nn.Module, spec: ArchSpec, head_layers: int) -> None:
        extras = tuple(p for p in (spec.embed, spec.position_embed, spec.embed_dropout) if p)
        super().__init__(model, spec, 0, head_layers, extras)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.get_submodule(self.spec.embed)(input_ids)  # (B, T, H)
        if self.spec.position_embed:
            hidden = hidden + self.get_submodule(self.spec.position_embed)(position_ids)
        if self.spec.embed_dropout:
            hidden = self.get_submodule(self.spec.embed_dropout)(hidden)
        return self.run_blocks(hidden, attention_mask, position_ids)  # (B, T, H) crosses cut 1


class Trunk(SplitPart):
    """The middle blocks. Runs on the server; sees only hidden states, mask and positions."""

    def __init__(self, model: nn.Module, spec: ArchSpec, start: int, stop: int) -> None:
        super().__init__(model, spec, start, stop, ())

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.run_blocks(hidden, attention_mask, position_ids)  # (B, T, H) crosses cut 2


class Tail(SplitPart):
    """The last ``q`` blocks + final norm + LM head. Runs on the client; owns the labels."""

    def __init__(self, model: nn.Module, spec: ArchSpec, tail_layers: int) -> None:
        n = len(_blocks(model, spec))
        super().__init__(model, spec, n - tail_layers, n, (spec.norm, spec.lm_head))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        logits: torch.Tensor = self.output_head()(self.final_hidden(hidden, attention_mask, position_ids))
        return logits  # (B, T, V)

    def final_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The tail blocks and the final norm: what the LM head reads ``(B, T, H)``."""
        normed: torch.Tensor = self.get_submodule(self.spec.norm)(self.run_blocks(hidden, attention_mask, position_ids))
        return normed

    def output_head(self) -> nn.Module:
        """The LM head (hidden ``(..., H)`` -> logits ``(..., V)``)."""
        return self.get_submodule(self.spec.lm_head)


class SplitParts(NamedTuple):
    head: Head
    trunk: Trunk
    tail: Tail


def num_blocks(model: nn.Module) -> int:
    return len(_blocks(model, _spec(model)))


def validate_cut(num_layers: int, head_layers: int, tail_layers: int) -> None:
    """Each part needs at least one block: p >= 1, q >= 1, p + q < N."""
    for name, value in (("head_layers", head_layers), ("tail_layers", tail_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SplitError(f"{name} must be an integer >= 1, got {value!r}")
    if head_layers + tail_layers >= num_layers:
        raise SplitError(
            f"head_layers + tail_layers must be < the model's {num_layers} blocks so the server keeps "
            f"at least one, got {head_layers} + {tail_layers} = {head_layers + tail_layers}"
        )


def split_model(model: nn.Module, head_layers: int = 1, tail_layers: int = 1) -> SplitParts:
    """Cut ``model`` (a Hugging Face ``*ForCausalLM``) into head, trunk and tail.

    The parts share their modules with ``model`` (no copy): train them and the unsplit model
    sees the change. Raises :class:`SplitError` for an impossible cut and
    :class:`~fedsplit.split.arch.UnsupportedArchitectureError` for an unknown architecture.
    """
    spec = _spec(model)
    n = len(_blocks(model, spec))
    validate_cut(n, head_layers, tail_layers)
    return SplitParts(
        head=Head(model, spec, head_layers),
        trunk=Trunk(model, spec, head_layers, n - tail_layers),
        tail=Tail(model, spec, tail_layers),
    )
