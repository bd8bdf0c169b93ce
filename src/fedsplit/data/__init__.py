"""Data for federated split fine-tuning: read any source, harmonize it, tokenize it.

In FL-GLM (arXiv 2406.14898) every client fine-tunes on its own private data and keeps its labels.
This package turns a client's data, whatever its schema, into canonical chat :class:`Example` objects
(:mod:`~fedsplit.data.readers`, :mod:`~fedsplit.data.harmonize`, :mod:`~fedsplit.data.tasks`), or onto the
run's data contract (:mod:`~fedsplit.data.contract`), splits a pool for simulation (:mod:`~fedsplit.data.partition`),
tokenizes them with a loss on the response only and pads batches (:mod:`~fedsplit.data.tokenize`),
and ships non-IID demo silos built from the Python standard library's docs
(:mod:`~fedsplit.data.stdlib_docs`). Nothing is read or imported heavily at import time.
"""

from __future__ import annotations

from fedsplit.data.contract import (
    ClientData,
    ClientSource,
    ContractError,
    ContractMismatchError,
    DataContract,
    DataReport,
    check_same_contract,
    check_source,
    contract_diff,
    contract_hash,
    load_client_data,
)
from fedsplit.data.errors import DataError, DataUnavailableError
from fedsplit.data.harmonize import SourceConfig, load_examples
from fedsplit.data.readers import Record, detect_format, read_records
from fedsplit.data.schema import ROLES, Example, Message
from fedsplit.data.shared import shared_data_dir
from fedsplit.data.stdlib_docs import FAMILIES, StdlibDocsSplit, stdlib_docs_silos
from fedsplit.data.tasks import TASKS, FieldMapping
from fedsplit.data.tokenize import IGNORE_INDEX, EncodedExample, collate, encode_example, encode_examples

__all__ = [
    "ClientData",
    "ClientSource",
    "ContractError",
    "ContractMismatchError",
    "DataContract",
    "DataReport",
    "check_same_contract",
    "check_source",
    "contract_diff",
    "contract_hash",
    "load_client_data",
    "FAMILIES",
    "IGNORE_INDEX",
    "ROLES",
    "TASKS",
    "DataError",
    "DataUnavailableError",
    "EncodedExample",
    "Example",
    "FieldMapping",
    "Message",
    "Record",
    "SourceConfig",
    "StdlibDocsSplit",
    "collate",
    "detect_format",
    "encode_example",
    "encode_examples",
    "load_examples",
    "read_records",
    "shared_data_dir",
    "stdlib_docs_silos",
]
