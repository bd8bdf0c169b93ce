"""A client's data report at JOIN_ROUND: checked, in the lobby log and metrics.jsonl; a bad one is refused."""

from __future__ import annotations

import logging

import pytest

from fedsplit.channel import RemoteError
from fedsplit.data import DataReport
from fedsplit.data.wire import report_to_message
from fedsplit.metrics import MetricsWriter, read_metrics
from fedsplit.protocol import pb

from .federation import make_federation

HASH = "ab" * 32
REPORT = DataReport(num_examples=8, label_histogram={"entailment": 5, "not_entailment": 3}, num_truncated=2,
                    num_rejected=1, rejected={"source 0: field 'label': unknown label": 1}, contract_hash=HASH)


def test_the_report_reaches_the_lobby_log_and_the_metrics(tmp_path, caplog):
    # Arrange
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    fed = make_federation(["a", "b"], num_rounds=1, local_steps=1, metrics=metrics, contract_hash=HASH)
    fed.runners["a"].data_report = report_to_message(REPORT)  # b, a client of a simulated silo, sends none

    # Act
    with caplog.at_level(logging.INFO, logger="fedsplit.server.data_reports"):
        fed.run()
    metrics.close()

    # Assert
    events = {e["client"]: e for e in read_metrics(tmp_path / "metrics.jsonl", "data_report")}
    assert events["a"]["data"] == REPORT.to_dict() and events["a"]["data"]["fraction_truncated"] == 0.25
    assert "data" not in events["b"]
    assert any("client a joined: 8 examples (entailment 5, not_entailment 3), 25.0% truncated, 1 rows rejected"
               in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("report", [
    DataReport(8, {"entailment": 8}, 0, 0, {}, "cd" * 32),  # validated against another contract
    DataReport(8, {"entailment": 3}, 0, 0, {}, HASH),  # the histogram does not add up
])
def test_a_report_that_does_not_fit_is_refused_with_bad_request(report):
    fed = make_federation(["a"], num_rounds=1, local_steps=1, contract_hash=HASH)
    channel = fed.connector("a")()

    with pytest.raises(RemoteError) as refused:
        channel.call(pb.JOIN_ROUND, pb.JoinRound(num_examples=8, data_report=report_to_message(report)))

    assert refused.value.code == pb.BAD_REQUEST and "data report" in refused.value.remote_message
