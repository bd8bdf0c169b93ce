"""Tests for fedsplit.models.llama2c: the llama2.c reader against a reference forward, and stories260k."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsplit.models import ModelLoadError, load_model
from fedsplit.models.llama2c import (
    STORIES260K_CHECKPOINT,
    STORIES260K_DIR,
    Llama2cHeader,
    interleaved_to_half_split,
    load_llama2c_model,
    load_stories260k,
    shared_root,
)

STORIES = shared_root() / "data" / "tinystories" / "validation_100.txt"
needs_stories260k = pytest.mark.skipif(
    not (shared_root() / STORIES260K_DIR / STORIES260K_CHECKPOINT).is_file() or not STORIES.is_file(),
    reason=f"shared data not found under {shared_root()} (set FEDSPLIT_SHARED)",
)

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
SMALL = (16, 24, 2, 4, 2, 32, 16)


def _write_checkpoint(path: Path, sizes: tuple[int, ...], *, shared: bool) -> dict[str, np.ndarray]:
    """A random llama2.c legacy checkpoint; returns its arrays by name."""
    header = Llama2cHeader(*sizes, shared_classifier=shared)
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(0, 0.3, shape).astype("<f4") for name, shape in header.tensor_shapes()}
    values = list(sizes)
    values[5] = values[5] if shared else -values[5]
    path.write_bytes(struct.pack("<7i", *values) + b"".join(a.tobytes() for a in arrays.values()))
    return arrays


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def _rotate_interleaved(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """llama2.c's RoPE: channels (2i, 2i+1) form one complex number."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (T, nh, hs/2)
    return torch.view_as_real(pairs * cis[:, None, :]).flatten(-2)  # (T, nh, hs)


def _reference_logits(arrays: dict[str, np.ndarray], sizes: tuple[int, ...], tokens: torch.Tensor) -> torch.Tensor:
    """llama2.c's model.py forward pass, written out for one sequence."""
    dim, _, n_layers, n_heads, n_kv_heads, _, _ = sizes
    w = {name: torch.from_numpy(a.copy()) for name, a in arrays.items()}
    hs, steps = dim // n_heads, tokens.shape[0]
    angles = torch.outer(torch.arange(steps).float(), 1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    cis = torch.polar(torch.ones_like(angles), angles)  # (T, hs/2)
    mask = torch.full((steps, steps), float("-inf")).triu(1)
    x = w["token_embedding"][tokens]  # (T, dim)
    for i in range(n_layers):
        h = _rms_norm(x, w["rms_att"][i])
        q = _rotate_interleaved((h @ w["wq"][i].T).view(steps, n_heads, hs), cis)
        k = _rotate_interleaved((h @ w["wk"][i].T).view(steps, n_kv_heads, hs), cis)
        v = (h @ w["wv"][i].T).view(steps, n_kv_heads, hs)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs) + mask  # (nh, T, T)
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(steps, dim)
        x = x + out @ w["wo"][i].T
        h = _rms_norm(x, w["rms_ffn"][i])
        x = x + (torch.nn.functional.silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    classifier = w.get("wcls", w["token_embedding"])
    return _rms_norm(x, w["rms_final"]) @ classifier.T  # (T, vocab)


@pytest.mark.parametrize("shared", [True, False])
def test_loaded_checkpoint_matches_llama2c_forward(tmp_path: Path, shared: bool) -> None:
    arrays = _write_checkpoint(tmp_path / "model.bin", SMALL, shared=shared)
    tokens = torch.tensor([1, 5, 9, 2, 31, 7, 7, 3, 12, 0])

    model = load_llama2c_model(tmp_path / "model.bin")
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]

    assert torch.allclose(logits, _reference_logits(arrays, SMALL, tokens), atol=1e-5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == shared


def test_permute_moves_rope_pairs_into_halves() -> None:
    rows = torch.tensor([[0.0], [10.0], [1.0], [11.0]])  # one head: x0, y0, x1, y1

    permuted = interleaved_to_half_split(rows, n_heads=1)

    assert permuted.flatten().tolist() == [0.0, 1.0, 10.0, 11.0]  # x0, x1, y0, y1


def test_truncated_checkpoint_is_rejected(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "model.bin", SMALL, shared=True)
    raw = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(raw[:-40])

    with pytest.raises(ModelLoadError, match="truncated"):
        load_llama2c_model(tmp_path / "model.bin")


def test_header_with_nonsense_sizes_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(struct.pack("<7i", 16, 0, 2, 4, 2, 32, 16))

    with pytest.raises(ModelLoadError, match="positive"):
        load_llama2c_model(tmp_path / "model.bin")


def test_missing_shared_data_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSPLIT_SHARED", str(tmp_path))

    with pytest.raises(ModelLoadError, match="FEDSPLIT_SHARED"):
        load_stories260k()


def _stories(count: int) -> list[str]:
    parts = STORIES.read_text(encoding="utf-8").split("<|endoftext|>")
    return [part.strip() for part in parts if part.strip()][:count]


@pytest.mark.shared
@needs_stories260k
def test_stories260k_predicts_tinystories_far_better_than_chance() -> None:
    model, tokenizer = load_model("stories260k")
    total, count = 0.0, 0

    for story in _stories(4):
        ids = tokenizer(story, return_tensors="pt")["input_ids"][:, :256]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1

    assert total / count < 2.5  # uniform over 512 tokens would be ln 512 = 6.24


@pytest.mark.shared
@needs_stories260k
def test_stories260k_tokenizer_adds_bos_round_trips_and_pads() -> None:
    _, tokenizer = load_model("stories260k")
    story = _stories(1)[0]

    ids = tokenizer(story)["input_ids"]

    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == story
    assert len(tokenizer) == 512
    assert tokenizer.pad_token == tokenizer.eos_token
