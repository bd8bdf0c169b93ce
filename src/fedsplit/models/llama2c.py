"""Karpathy's llama2.c checkpoints as Hugging Face Llama models; the real pretrained ``stories260k``.

FL-GLM (arXiv 2406.14898) fine-tunes a *pretrained* LM, and tests want one that is small yet has
learnt something: stories260K (dim 64, 5 layers, TinyStories) is it. Its checkpoint uses llama2.c's
legacy format: seven little-endian int32s (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means an untied classifier), then fp32 tensors in a fixed order. The
file is read with numpy, never with ``torch.load`` or pickle. llama2.c rotates interleaved pairs of
q/k channels while HF Llama rotates the two halves of each head, so wq and wk are permuted on the way in.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerBase

from fedsplit.models.errors import ModelLoadError

SHARED_ENV = "FEDSPLIT_SHARED"
STORIES260K_DIR = Path("data/models/stories260k")
STORIES260K_CHECKPOINT = "stories260K.bin"
STORIES260K_TOKENIZER = "tok512.model"

_HEADER = struct.Struct("<7i")
_ROPE_THETA = 10000.0  # llama2.c's model.py
_RMS_NORM_EPS = 1e-5  # llama2.c's model.py


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven numbers at the start of a legacy llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    def __post_init__(self) -> None:
        names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
        bad = {name: getattr(self, name) for name in names if getattr(self, name) <= 0}
        if bad:
            raise ModelLoadError(f"llama2.c header: expected positive sizes, got {bad}; is this a llama2.c checkpoint?")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ModelLoadError(
                "llama2.c header: expected dim divisible by n_heads, n_heads by n_kv_heads and an even head size, "
                f"got dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Llama2cHeader:
        if len(raw) < _HEADER.size:
            raise ModelLoadError(f"llama2.c checkpoint: expected a {_HEADER.size}-byte header, got {len(raw)} bytes")
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = _HEADER.unpack_from(raw)
        return cls(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len, vocab_size > 0)

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every fp32 array after the header, in file order (Linear weights are (out, in))."""
        d, h, n, kv = self.dim, self.hidden_dim, self.n_layers, self.kv_dim
        shapes = [
            ("token_embedding", (self.vocab_size, d)),
            ("rms_att", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, kv, d)),
            ("wv", (n, kv, d)),
            ("wo", (n, d, d)),
            ("rms_ffn", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),  # unused: HF recomputes RoPE
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        return shapes if self.shared_classifier else [*shapes, ("wcls", (self.vocab_size, d))]

    def to_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=_RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
            tie_word_embeddings=self.shared_classifier,
            bos_token_id=1,  # SentencePiece ids used by llama2.c's tokenizers
            eos_token_id=2,
        )


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Header and named fp32 arrays of a legacy llama2.c checkpoint."""
    raw = Path(path).read_bytes()
    header = Llama2cHeader.from_bytes(raw)
    floats = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size)
    shapes = header.tensor_shapes()
    expected = sum(int(np.prod(shape)) for _, shape in shapes)
    if floats.size != expected:
        raise ModelLoadError(
            f"llama2.c checkpoint {path}: the header {header} needs {expected} fp32 values, the file has "
            f"{floats.size}; the file is truncated or not in llama2.c's legacy format"
        )
    arrays, start = {}, 0
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = floats[start : start + count].reshape(shape)
        start += count
    return header, arrays


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows from llama2.c's (x0, y0, x1, y1, ...) RoPE pairs to HF's (x0, x1, ..., y0, y1, ...).

    This is ``permute`` from transformers' ``convert_llama_weights_to_hf.py``.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_state_dict(header: Llama2cHeader, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The arrays renamed (and q/k permuted) for ``LlamaForCausalLM``."""
    t = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
    state = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": t["rms_att"][i],
            prefix + "self_attn.q_proj.weight": interleaved_to_half_split(t["wq"][i], header.n_heads),
            prefix + "self_attn.k_proj.weight": interleaved_to_half_split(t["wk"][i], header.n_kv_heads),
            prefix + "self_attn.v_proj.weight": t["wv"][i],
            prefix + "self_attn.o_proj.weight": t["wo"][i],
            prefix + "post_attention_layernorm.weight": t["rms_ffn"][i],
            prefix + "mlp.gate_proj.weight": t["w1"][i],
            prefix + "mlp.down_proj.weight": t["w2"][i],
            prefix + "mlp.up_proj.weight": t["w3"][i],
        }
    state["lm_head.weight"] = t["token_embedding"] if header.shared_classifier else t["wcls"]
    return state


def load_llama2c_model(path: str | os.PathLike[str]) -> LlamaForCausalLM:
    """An fp32 ``LlamaForCausalLM`` in eval mode holding a legacy llama2.c checkpoint."""
    header, arrays = read_llama2c_checkpoint(path)
    model = LlamaForCausalLM(header.to_config())
    model.load_state_dict(llama2c_state_dict(header, arrays), strict=True)
    if header.shared_classifier:
        model.tie_weights()
    return model.eval()


def load_sentencepiece_tokenizer(path: str | os.PathLike[str]) -> LlamaTokenizer:
    """A fast Llama tokenizer converted in memory from a SentencePiece ``.model`` file (adds BOS, no pad).

    It matches SentencePiece token for token except on runs of spaces, which SentencePiece collapses
    (``remove_extra_whitespaces``) and this tokenizer keeps.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"SentencePiece model {path} not found")
    native = LlamaTokenizer.convert_to_native_format(vocab_file=str(path))
    return LlamaTokenizer(**native, add_bos_token=True, add_eos_token=False)


def shared_root() -> Path:
    """``$FEDSPLIT_SHARED``, else the ``shared`` folder next to the repository."""
    override = os.environ.get(SHARED_ENV)
    return Path(override).expanduser() if override else Path(__file__).resolve().parents[3].parent / "shared"


def load_stories260k(*, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The pretrained stories260K Llama and its 512-token SentencePiece tokenizer from the shared data."""
    folder = shared_root() / STORIES260K_DIR
    checkpoint, tokenizer_model = folder / STORIES260K_CHECKPOINT, folder / STORIES260K_TOKENIZER
    missing = [str(p) for p in (checkpoint, tokenizer_model) if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"'stories260k' needs {' and '.join(missing)}; point ${SHARED_ENV} at the shared folder "
            "that holds data/models/stories260k"
        )
    return load_llama2c_model(checkpoint).to(dtype), load_sentencepiece_tokenizer(tokenizer_model)  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to loses the bound self
