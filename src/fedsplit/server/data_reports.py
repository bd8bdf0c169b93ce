"""The server's side of the clients' data reports (cross-cloud data harmonization, arXiv 2503.12226).

A client validates its own files against the run's data contract before it joins and sends only
the aggregate counts in ``JoinRound.data_report`` (:mod:`fedsplit.data.wire`). The server checks
the report, shows it in its lobby log and writes it to ``metrics.jsonl``; it never reads a row.
"""

from __future__ import annotations

import logging
from typing import Any

from fedsplit.data.contract import ContractError, DataReport
from fedsplit.data.wire import describe_report, report_from_message
from fedsplit.protocol import ProtocolError, pb

log = logging.getLogger(__name__)


def read_data_report(client_id: str, request: pb.JoinRound, contract_hash: str = "") -> DataReport | None:
    """The checked report of ``request`` (``None`` when the client sent none).

    A malformed report, or one validated against another contract, is refused with ``BAD_REQUEST``.
    """
    if not request.HasField("data_report"):
        return None
    try:
        return report_from_message(request.data_report, contract_hash=contract_hash)
    except ContractError as exc:
        raise ProtocolError(f"JoinRound: client {client_id}: {exc}", code=pb.BAD_REQUEST) from None


def announce_data_report(client_id: str, weight: int, report: DataReport | None) -> dict[str, Any]:
    """Log the lobby line of a client's first report; the fields for the ``data_report`` metrics event."""
    if report is None:
        log.info("lobby: client %s joined with %d examples (no data report)", client_id, weight)
        return {}
    log.info("lobby: client %s joined: %s; FedAvg weight %d", client_id, describe_report(report), weight)
    return {"data": report.to_dict()}
