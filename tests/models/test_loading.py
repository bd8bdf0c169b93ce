"""Tests for fedsplit.models.loading: name resolution, local folders, the hub path offline, post-conditions."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from fedsplit.models import ModelLoadError, load_model
from fedsplit.models.loading import LoadOptions, ensure_pad_token, hub_reachable
from fedsplit.models.tokenizer import build_tiny_tokenizer

HUB_ID = "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline mode on and an empty Hugging Face cache of our own (returned)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-qwen2", seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer("round trip", return_tensors="pt")["input_ids"]

    loaded, loaded_tokenizer = load_model(tmp_path)

    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded_tokenizer("round trip")["input_ids"] == ids[0].tolist()


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_directory_without_tokenizer_is_rejected(tmp_path: Path) -> None:
    model, _ = load_model("tiny-llama")
    model.save_pretrained(tmp_path)

    with pytest.raises(ModelLoadError, match="tokenizer.save_pretrained"):
        load_model(tmp_path)


def test_hub_id_offline_fails_fast_with_advice(offline_hub: Path) -> None:
    start = time.monotonic()

    with pytest.raises(ModelLoadError) as raised:
        load_model(HUB_ID)

    assert time.monotonic() - start < 5
    message = str(raised.value)
    assert HUB_ID in message
    assert "local directory" in message
    assert "smollm2-135m" in message


def test_hub_id_offline_loads_from_the_local_hugging_face_cache(offline_hub: Path) -> None:
    model, tokenizer = load_model("tiny-llama", seed=4)
    commit = "0" * 40
    repo = offline_hub / "models--fedsplit-tests--tiny-llama"
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ids = tokenizer("cached", return_tensors="pt")["input_ids"]

    loaded, _ = load_model("fedsplit-tests/tiny-llama")

    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_unreachable_hub_fails_fast_even_without_offline_mode(
    monkeypatch: pytest.MonkeyPatch, offline_hub: Path
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    start = time.monotonic()

    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model(HUB_ID)

    assert time.monotonic() - start < 5


def test_any_http_answer_means_the_hub_is_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    http = importlib.import_module(huggingface_hub.errors.Response.__module__.split(".")[0])  # hub's HTTP library
    response = http.Response(404, request=http.Request("HEAD", "https://huggingface.co"))

    def not_found(*args: object, **kwargs: object) -> None:
        raise huggingface_hub.errors.RepositoryNotFoundError("404 repo not found", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)

    assert hub_reachable(HUB_ID)


def test_unknown_name_lists_what_is_accepted() -> None:
    with pytest.raises(ModelLoadError, match="tiny-llama") as raised:
        load_model("no-such-model")

    assert "hub id" in str(raised.value)


def test_dtype_is_applied_to_every_parameter() -> None:
    model, _ = load_model("tiny-glm", dtype=torch.bfloat16)

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_pad_token_falls_back_to_eos() -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None

    ensure_pad_token(tokenizer)

    assert tokenizer.pad_token == tokenizer.eos_token


@pytest.mark.parametrize(
    ("options", "error"),
    [({"dtype": torch.int64}, TypeError), ({"seed": -1}, ValueError), ({"seed": 1.5}, ValueError)],
)
def test_load_options_reject_bad_values(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="expected"):
        LoadOptions(**options)  # type: ignore[arg-type]


def test_load_options_turn_cache_dir_into_a_path() -> None:
    options = LoadOptions(cache_dir="~/somewhere")  # type: ignore[arg-type]

    assert options.cache_dir == Path("~/somewhere").expanduser()
