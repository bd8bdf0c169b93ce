"""A network client's own data: ``[[client.sources]]`` under the run's ``[contract]``, checked locally.

Cross-cloud federation (arXiv 2503.12226, "cross-cloud data harmonization"): each client reads
its own files, in its own shape, and maps them onto the contract the whole run declares. All of
it happens in the client process, before it dials the server::

    [[client.sources]] (paths relative to the config file) -> load_client_data(contract, sources, tokenizer)
        -> a bad row: DataError naming file, line and field (or skipped and counted: on_error = "skip")
        -> encoded examples -> shuffled (train.seed) -> micro-batches of train.batch_size
        -> DataReport (counts only) -> JoinRound.data_report

The server's configuration names no data; it sees the report and nothing else.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path

from fedsplit.config import RunConfig
from fedsplit.data.contract import ClientSource, ContractError, DataReport, load_client_data
from fedsplit.protocol import pb

log = logging.getLogger(__name__)


def resolve_sources(sources: list[ClientSource], config_dir: Path) -> list[ClientSource]:
    """File paths relative to the client's config file, as ``keys_dir`` is (``hf://`` URIs unchanged)."""
    resolved = []
    for source in sources:
        path = Path(source.path)
        if source.path.startswith("hf://") or path.is_absolute():
            resolved.append(source)
        else:
            resolved.append(replace(source, path=str((config_dir / path).resolve())))
    return resolved


def own_client_batches(cfg: RunConfig, config_dir: Path, tokenizer) -> tuple[list[dict], DataReport]:
    """This client's sources, validated against ``cfg.contract``, as fixed micro-batches, and its report."""
    contract = cfg.contract
    if not contract.declared:
        raise ContractError("[[client.sources]] needs the run's data contract: [contract] prompt_template is empty")
    if contract.max_length > cfg.train.max_length:
        raise ContractError(f"contract.max_length ({contract.max_length}) must be <= train.max_length "
                            f"({cfg.train.max_length}): the server bounds every FORWARD by the latter")
    if contract.tokenizer and contract.tokenizer != cfg.model.name:
        raise ContractError(f"contract.tokenizer is {contract.tokenizer!r}, but this client loads model.name = "
                            f"{cfg.model.name!r}")
    data = load_client_data(contract, resolve_sources(cfg.client.sources, config_dir), tokenizer)
    assert data.encoded is not None  # a tokenizer was given
    encoded = list(data.encoded)
    random.Random(cfg.train.seed).shuffle(encoded)
    size = cfg.train.batch_size
    if len(encoded) < size:
        raise ContractError(f"client {cfg.client.id}: {len(encoded)} usable examples, fewer than one batch "
                            f"(train.batch_size = {size}); report: {data.report.to_dict()}")
    from fedsplit.data import collate

    batches = [collate(encoded[i : i + size], tokenizer.pad_token_id, cfg.train.padding_side)
               for i in range(0, len(encoded) - size + 1, size)]
    return batches, data.report


def report_message(report: DataReport | None) -> pb.DataReport | None:
    """The report as ``JoinRound.data_report`` (``None``: a client of a simulated silo sends none)."""
    from fedsplit.data.wire import report_to_message

    return None if report is None else report_to_message(report)
