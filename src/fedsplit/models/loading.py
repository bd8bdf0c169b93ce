"""``load_model``: one name in, a causal LM and its tokenizer out, ready to be split (FL-GLM, arXiv 2406.14898).

A name is resolved in this order: a fedsplit model name (``NAMED_MODELS``), an existing local Hugging
Face model directory, a Hugging Face hub id. Hub loading keeps the real hub path but never hangs
offline: a single HEAD request without retries decides whether the hub is reachable (huggingface_hub
alone would retry with back-off for about 25 s), and when it is not, or ``HF_HUB_OFFLINE`` is set,
the model is read from its snapshot in the local Hugging Face cache or a ``ModelLoadError`` says
how to pass a local directory instead.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedsplit.models.errors import ModelLoadError
from fedsplit.models.gguf import load_smollm2_135m
from fedsplit.models.llama2c import load_stories260k
from fedsplit.models.tiny import TINY_MODELS, load_tiny

logger = logging.getLogger(__name__)

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PROBE_TIMEOUT_S = 5.0
_TRUE_VALUES = {"1", "on", "yes", "true"}  # what huggingface_hub accepts for HF_HUB_OFFLINE


@dataclass(frozen=True)
class LoadOptions:
    """What every loader may need besides the name."""

    dtype: torch.dtype = torch.float32  # floating dtype of the returned weights
    cache_dir: Path | None = None  # fedsplit's conversion cache; None = $FEDSPLIT_CACHE or ~/.cache/fedsplit
    seed: int = 0  # initialisation seed of the tiny random models

    def __post_init__(self) -> None:
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype such as torch.float32, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())


def _tiny_loader(name: str) -> Callable[[LoadOptions], Loaded]:
    return lambda options: load_tiny(name, dtype=options.dtype, seed=options.seed)


NAMED_MODELS: Mapping[str, Callable[[LoadOptions], Loaded]] = MappingProxyType(
    {
        "smollm2-135m": lambda options: load_smollm2_135m(dtype=options.dtype, cache_dir=options.cache_dir),
        "stories260k": lambda options: load_stories260k(dtype=options.dtype),
        **{name: _tiny_loader(name) for name in TINY_MODELS},
    }
)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Loaded:
    """Load a causal LM (``*ForCausalLM``, eval mode) and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (offline default, SmolLM2-135M-Instruct), ``"stories260k"``,
            a tiny random model (``fedsplit.models.TINY_MODELS``), a local Hugging Face model
            directory (``config.json`` + weights + tokenizer files), or a Hugging Face hub id.
        dtype: floating dtype of the returned weights.
        cache_dir: where converted models are cached (default ``$FEDSPLIT_CACHE`` or ``~/.cache/fedsplit``).
        seed: initialisation seed; only the tiny random models use it.

    The tokenizer always has a pad token. When the checkpoint defines none, the EOS token (else the
    UNK token) doubles as pad, so mask padding with the attention mask, not by comparing ids.

    Raises:
        ModelLoadError: unknown name, missing files or package, hub unreachable or id not found.
    """
    options = LoadOptions(dtype=dtype, cache_dir=None if cache_dir is None else Path(cache_dir), seed=seed)
    model, tokenizer = _resolve(os.fspath(name_or_path))(options)
    return _finish(model, tokenizer, options.dtype)


def _resolve(name: str) -> Callable[[LoadOptions], Loaded]:
    if name in NAMED_MODELS:
        return NAMED_MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return partial(_load_local_dir, path)
    if _HUB_ID.fullmatch(name):
        return partial(_load_hub_id, name)
    raise ModelLoadError(
        f"unknown model {name!r}: not a fedsplit model name ({', '.join(NAMED_MODELS)}), "
        "not an existing directory and not a Hugging Face hub id of the form 'owner/name' "
        "(e.g. 'HuggingFaceTB/SmolLM2-360M-Instruct')"
    )


def _load_local_dir(path: Path, options: LoadOptions) -> Loaded:
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json; expected a Hugging Face model directory as written by "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=options.dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load a causal LM from {path}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"{path} holds a model but no usable tokenizer ({error}); "
            "save one there with tokenizer.save_pretrained(dir)"
        ) from error
    return model, tokenizer


def _load_hub_id(repo_id: str, options: LoadOptions) -> Loaded:
    if hub_offline() or not hub_reachable(repo_id):
        # Offline, even with local_files_only, from_pretrained still probes the hub (with retries and
        # back-off) for an adapter config; reading the cached snapshot as a local folder never does.
        return _load_local_dir(_cached_snapshot(repo_id), options)
    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=options.dtype)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except (OSError, ValueError) as error:
        reason = f"the Hugging Face hub could not provide it ({error})"
        raise ModelLoadError(_hub_failure_message(repo_id, reason)) from error
    return model, tokenizer


def _cached_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of ``repo_id``, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except OSError as error:  # LocalEntryNotFoundError is a FileNotFoundError
        reason = "the Hugging Face hub is unreachable (offline) and the model is not in the local Hugging Face cache"
        raise ModelLoadError(_hub_failure_message(repo_id, reason)) from error


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on, read now (huggingface_hub reads it once at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.strip().lower() in _TRUE_VALUES for flag in flags)


def hub_reachable(repo_id: str) -> bool:
    """One HEAD request for the repo's config.json, without huggingface_hub's retries and back-off.

    Any HTTP answer (even 404 or 401) means the hub is reachable; from_pretrained then reports it.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=_HUB_PROBE_TIMEOUT_S, retry_on_errors=False)
    except HfHubHTTPError:
        return True
    except Exception as error:  # DNS failure, refused connection, timeout, offline mode: all mean "unreachable"
        logger.info("Hugging Face hub unreachable (%s); using the local cache only", error)
        return False
    return True


def _hub_failure_message(repo_id: str, reason: str) -> str:
    return (
        f"could not load {repo_id!r}: {reason}. Download it where you have network access "
        f"(e.g. `hf download {repo_id} --local-dir DIR`) and pass the local directory instead "
        "(load_model('DIR'), a folder with config.json, weights and tokenizer files), "
        "or use 'smollm2-135m', which is bundled and works offline."
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token if it has none: its EOS token, else its UNK token."""
    if tokenizer.pad_token is not None:
        return tokenizer
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise ModelLoadError("the tokenizer has no pad, EOS or UNK token to pad with; set tokenizer.pad_token")
    tokenizer.pad_token = fallback
    return tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> Loaded:
    """Common post-conditions: pad token on tokenizer and model, requested dtype, eval mode."""
    ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval(), tokenizer  # type: ignore[arg-type]  # transformers' @wraps on PreTrainedModel.to loses the bound self
