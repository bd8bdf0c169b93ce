"""A client's :class:`~fedsplit.data.contract.DataReport` as the protobuf message it travels in.

Cross-cloud federation (arXiv 2503.12226) harmonizes each cloud's data locally; the only thing
about its data a client sends is the report's aggregate counts, in ``JoinRound.data_report``::

    client: load_client_data(...).report -> report_to_message -> JoinRound.data_report
    server: JoinRound.data_report -> report_from_message (checked: counts, names, hash) -> lobby log, metrics

No row, no text of a row and no file name crosses: the keys are contract labels and the reject
reasons ``"source <n>: field '<column>': <kind>"`` built by the contract's loader.
"""

from __future__ import annotations

from fedsplit.data.contract import ContractError, DataReport
from fedsplit.protocol import pb

MAX_KEYS = 256  # label and reject-reason entries a report may carry
MAX_KEY_CHARS = 200


def report_to_message(report: DataReport) -> pb.DataReport:
    return pb.DataReport(
        num_examples=report.num_examples,
        label_histogram=report.label_histogram,
        num_truncated=report.num_truncated,
        num_rejected=report.num_rejected,
        rejected=report.rejected,
        contract_hash=report.contract_hash,
    )


def report_from_message(message: pb.DataReport, *, contract_hash: str = "") -> DataReport:
    """The report a client sent, checked; ``contract_hash`` (when given) must be the one it names.

    Raises :class:`ContractError` naming what is wrong.
    """
    for name in ("label_histogram", "rejected"):
        table = getattr(message, name)
        if len(table) > MAX_KEYS:
            raise ContractError(f"data report: {name}: expected at most {MAX_KEYS} entries, got {len(table)}")
        long = [key[:40] for key in table if len(key) > MAX_KEY_CHARS]
        if long:
            raise ContractError(f"data report: {name}: expected keys of at most {MAX_KEY_CHARS} characters, "
                                f"got {long[0]!r}...")
    report = DataReport.from_dict({
        "num_examples": int(message.num_examples),
        "label_histogram": {key: int(count) for key, count in sorted(message.label_histogram.items())},
        "num_truncated": int(message.num_truncated),
        "num_rejected": int(message.num_rejected),
        "rejected": {key: int(count) for key, count in sorted(message.rejected.items())},  # maps keep no order
        "contract_hash": message.contract_hash,
    })
    if contract_hash and report.contract_hash != contract_hash:
        raise ContractError(f"data report: validated against contract {report.contract_hash[:12] or 'none'}..., "
                            f"expected this run's contract {contract_hash[:12]}...")
    if sum(report.label_histogram.values()) not in (0, report.num_examples):
        raise ContractError(f"data report: label_histogram sums to {sum(report.label_histogram.values())}, "
                            f"expected num_examples = {report.num_examples}")
    if sum(report.rejected.values()) != report.num_rejected:
        raise ContractError(f"data report: rejected sums to {sum(report.rejected.values())}, "
                            f"expected num_rejected = {report.num_rejected}")
    return report


def describe_report(report: DataReport) -> str:
    """One line for the server's lobby log: examples, labels, truncated share, rejected rows by reason."""
    labels = ", ".join(f"{label} {count}" for label, count in report.label_histogram.items()) or "no labels"
    line = (f"{report.num_examples} examples ({labels}), {100 * report.fraction_truncated:.1f}% truncated, "
            f"{report.num_rejected} rows rejected")
    if report.rejected:
        line += " (" + "; ".join(f"{reason}: {count}" for reason, count in report.rejected.items()) + ")"
    return line
