"""``fedsplit generate``: text from a fine-tuned split model, each party keeping its own KV cache.

Three ways to run it, each reading top to bottom: model parts -> trunk link -> generate:

* local (``--run DIR``): the base model with the run's adapters (head, trunk and tail, as merged
  by the run), cut and generated in this process;
* client (``--config client.toml --server``): this client's head and tail (with the head/tail
  adapters of ``--run`` if given) against the trunk of a running ``fedsplit server``, over the
  run's sealed gRPC session (the server serves generation between rounds);
* serve (``--config server.toml --serve``): a server started for serving generation only, with
  the trunk adapter of ``--run``; no training request is answered.

A P-tuning v2 run (``[method] name = "prefix"``) leaves one PEFT prefix-tuning adapter of the three
parts, ``adapters/prefix``: local mode loads all of its prefixes into the parts, the client its head's
and tail's, the serving server its trunk's (:func:`fedsplit.split.prefix.load_prefix_adapter`); client
and serve modes need ``--run`` then (the initial prefixes are random, not a base model).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedsplit.inference import LocalTrunk, SamplingSettings, SplitGenerator
from fedsplit.inference.generate import eos_ids
from fedsplit.recipes.export_prefix import find_prefix_adapter

log = logging.getLogger(__name__)


@dataclass
class GenerateJob:
    """One ``fedsplit generate`` invocation (flags already parsed)."""

    prompts: list[str]
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    chat: bool | None = None  # None: the tokenizer's chat template when it has one
    model: str | None = None  # local mode: the base model (default: the adapter's base model)
    run: Path | None = None  # a run directory or an adapter directory
    head_layers: int = 1  # local mode: the cut (the tokens do not depend on it)
    tail_layers: int = 1

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts: expected at least one non-empty prompt, got {self.prompts!r}")


def causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` inside a PEFT model (its LoRA layers in place), or the model itself."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def local_generator(job: GenerateJob) -> SplitGenerator:
    """Base model + the run's adapters, cut into head / trunk / tail in this process."""
    from fedsplit.recipes.eval_task import load_eval_model
    from fedsplit.split import split_model

    prefix = find_prefix_adapter(job.run) if job.run is not None else None
    if prefix is not None:
        return prefix_generator(job, prefix)
    model, tokenizer, description = load_eval_model(job.model, job.run)
    lm = causal_lm(model).eval()
    parts = split_model(lm, job.head_layers, job.tail_layers)
    log.info("generating with %s (cut %d | trunk | %d)", description, job.head_layers, job.tail_layers)
    return SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer,
                          eos_token_ids=eos_ids(tokenizer, getattr(lm, "generation_config", None)))


def prefix_generator(job: GenerateJob, adapter: Path) -> SplitGenerator:
    """Base model cut into head / trunk / tail, each with its prefixes from the run's prefix adapter."""
    from fedsplit.models import load_model
    from fedsplit.split import split_model
    from fedsplit.split.prefix import load_prefix_adapter

    name = job.model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter}: the adapter names no base model; pass --model")
    lm, tokenizer = load_model(name)
    parts = split_model(lm.eval(), job.head_layers, job.tail_layers)
    width = load_prefix_adapter(list(parts), adapter)
    log.info("generating with %s + %s (P-tuning v2, %d virtual tokens; cut %d | trunk | %d)", name, adapter, width,
             job.head_layers, job.tail_layers)
    return SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer,
                          eos_token_ids=eos_ids(tokenizer, getattr(lm, "generation_config", None)))


def load_run_prefixes(parts: Any, run: Path | None, names: tuple[str, ...]) -> None:
    """The prefixes of ``names`` from the run's ``adapters/prefix``, or for a client's head and tail from its own
    ``adapters/client-prefix`` (the initial ones are random: required)."""
    from fedsplit.recipes.network import CLIENT_PREFIX
    from fedsplit.split.prefix import PART_PREFIXES, load_part_prefixes, load_prefix_adapter

    adapter = find_prefix_adapter(run) if run is not None else None
    if adapter is not None:
        load_prefix_adapter([getattr(parts, name) for name in names], adapter)
        return
    for own in ((run, run / "adapters" / CLIENT_PREFIX) if run is not None else ()):
        if (own / PART_PREFIXES).is_file():  # a client's own copy of its head/tail prefixes (fedsplit client)
            load_part_prefixes([getattr(parts, name) for name in names], own)
            return
    raise FileNotFoundError(f"method.name = 'prefix': pass --run with the run's P-tuning v2 adapter "
                            f"(expected {run or 'RUN'}/adapters/prefix/adapter_config.json, or a client's "
                            f"{run or 'RUN'}/adapters/{CLIENT_PREFIX}/{PART_PREFIXES}); the "
                            f"{'/'.join(names)} prefixes a run starts from are random")


def write_stream(generator: SplitGenerator, job: GenerateJob, out: TextIO | None = None) -> list[str]:
    """Generate for every prompt, writing the pieces as they come; returns the answers."""
    out = out if out is not None else sys.stdout
    answers = []
    for index, prompt in enumerate(job.prompts):
        if len(job.prompts) > 1:
            out.write(f"### {index + 1}\n")
        pieces: list[str] = []
        for piece in generator.stream(prompt, job.settings, chat=job.chat):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        answers.append("".join(pieces))
    return answers


def run_generate_local(job: GenerateJob, out: TextIO | None = None) -> list[str]:
    return write_stream(local_generator(job), job, out)


# -- client of a running server ------------------------------------------------------------------
def load_part_adapters(parts: Any, run: Path, names: tuple[str, ...]) -> None:
    """The per-part adapters a run saved (``adapters/<part>`` below a run or simulate directory)."""
    from fedsplit.adapters import load_adapter

    for base in (run, run / "adapters", run / "server" / "adapters", run / "federated" / "server" / "adapters"):
        if all((base / name / "adapter_config.json").is_file() for name in names):
            for name in names:
                load_adapter(getattr(parts, name), base / name)
            return
    raise FileNotFoundError(f"{run}: no {'/'.join(names)} adapters "
                            f"(expected {run}/adapters/<part>/adapter_config.json)")


def run_generate_client(job: GenerateJob, cfg: Any, config_dir: Path, out: TextIO | None = None) -> list[str]:
    """This client's head and tail against the trunk of the running server, over the sealed session."""
    from fedsplit.config import run_config_hash, run_config_sections
    from fedsplit.inference.remote import RemoteTrunk
    from fedsplit.recipes.network import build_parts, dial, keys_dir
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.security.tls import load_channel_tls
    from fedsplit.transport.handshake import ClientCredentials

    tokenizer, parts = build_parts(cfg)
    if cfg.method.name == "prefix":
        load_run_prefixes(parts, job.run, ("head", "tail"))
    elif job.run is not None:
        load_part_adapters(parts, job.run, ("head", "tail"))
    keys, cid = keys_dir(cfg, config_dir), cfg.client.id
    credentials = ClientCredentials(
        identity=load_private_key(keys / f"{cid}.key"),
        server_key=load_public_key(keys / f"{cfg.security.server_name}.pub"),
        client_id=cid, run_id=cfg.security.run_id, config_hash=run_config_hash(cfg, tokenizer),
        config_sections=run_config_sections(cfg, tokenizer))
    tls = None
    if not cfg.security.insecure:
        mtls = (keys / f"{cid}-tls.key", keys / f"{cid}-tls.crt") if cfg.security.mutual_tls else (None, None)
        tls = load_channel_tls(keys / "ca.crt", *mtls)
    channel = dial(cfg.server.address, credentials, tls=tls, max_message_bytes=cfg.server.max_message_bytes,
                   deadline_s=cfg.server.deadline_s)
    try:
        generator = SplitGenerator(parts.head, parts.tail, RemoteTrunk(channel), tokenizer)
        return write_stream(generator, job, out)
    finally:
        channel.close()


# -- a server for serving only -------------------------------------------------------------------
def run_serve(cfg: Any, config_dir: Path, run: Path | None, *, ready: Callable[[Any], None] | None = None,
              stop: Any = None) -> int:
    """Serve GENERATE_* (and evaluation FORWARDs) from the trunk with ``run``'s trunk adapter until stopped."""
    import threading

    from fedsplit.config import run_config_hash, run_config_sections
    from fedsplit.protocol import PROTOCOL_VERSION
    from fedsplit.recipes.network import build_parts, frame_bound, keys_dir
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.security.tls import load_server_tls
    from fedsplit.server import TrunkServer
    from fedsplit.server.generation import GenerationService, serving_handlers
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import SessionFactory

    tokenizer, parts = build_parts(cfg)
    if cfg.method.name == "prefix":
        load_run_prefixes(parts, run, ("trunk",))
    elif run is not None:
        load_part_adapters(parts, run, ("trunk",))
    keys = keys_dir(cfg, config_dir)
    service = GenerationService(parts.trunk)
    evaluate = TrunkServer(parts.trunk, cfg.train, total_steps=1, max_abs=cfg.server.max_abs_value)
    admitted = {cid: load_public_key(keys / f"{cid}.pub") for cid in cfg.security.clients}
    verifier = HandshakeVerifier(load_private_key(keys / f"{cfg.security.server_name}.key"), admitted,
                                 set(cfg.security.revoked), int(PROTOCOL_VERSION), run_config_hash(cfg, tokenizer),
                                 run_id=cfg.security.run_id, config_sections=run_config_sections(cfg, tokenizer))
    tls = None if cfg.security.insecure else load_server_tls(
        keys / "server-tls.key", keys / "server-tls.crt", keys / "ca.crt" if cfg.security.mutual_tls else None)
    server = GrpcServer(cfg.server.address, SessionFactory(verifier, serving_handlers(service, evaluate),
                                                           cfg.security.run_id),
                        tls=tls, insecure=cfg.security.insecure, max_message_bytes=cfg.server.max_message_bytes,
                        max_frame_bytes=max(frame_bound(cfg, parts), cfg.server.max_message_bytes),
                        max_streams=2 * len(cfg.security.clients) + 4, on_disconnect=service.drop_client)
    server.start()
    log.info("serving generation for %s on %s", cfg.security.run_id, cfg.server.address)
    stop = stop if stop is not None else threading.Event()
    if ready is not None:
        ready(server)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.stop(grace=1.0)
    return 0
