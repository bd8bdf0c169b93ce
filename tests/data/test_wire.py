"""Tests for fedsplit.data.wire: a DataReport through its protobuf message, checked on arrival."""

from __future__ import annotations

import pytest

from fedsplit.data import ContractError, DataReport
from fedsplit.data.wire import describe_report, report_from_message, report_to_message
from fedsplit.protocol import pb

HASH = "ab" * 32
REPORT = DataReport(num_examples=5, label_histogram={"negative": 2, "positive": 3}, num_truncated=1, num_rejected=2,
                    rejected={"source 1: field 'y': unknown label": 2}, contract_hash=HASH)


def test_a_report_survives_the_wire_and_says_only_counts():
    # Act
    message = pb.JoinRound(num_examples=4, data_report=report_to_message(REPORT))
    received = pb.JoinRound.FromString(message.SerializeToString())

    # Assert
    assert report_from_message(received.data_report, contract_hash=HASH) == REPORT
    assert describe_report(REPORT) == ("5 examples (negative 2, positive 3), 20.0% truncated, 2 rows rejected "
                                       "(source 1: field 'y': unknown label: 2)")


@pytest.mark.parametrize(("change", "match"), [
    ({"contract_hash": "cd" * 32}, "expected this run's contract"),
    ({"num_truncated": 9}, "num_truncated <= num_examples"),
    ({"label_histogram": {"positive": 1}}, "label_histogram sums to 1"),
    ({"num_rejected": 5}, "rejected sums to 2"),
    ({"rejected": {"x" * 300: 2}}, "at most 200 characters"),
    ({"label_histogram": {f"l{i}": 0 for i in range(300)}}, "at most 256 entries"),
])
def test_a_report_that_does_not_add_up_is_refused(change: dict, match: str):
    fields = {**REPORT.to_dict(), **change}
    fields.pop("fraction_truncated")
    message = pb.DataReport(**fields)

    with pytest.raises(ContractError, match=match):
        report_from_message(message, contract_hash=HASH)


def test_without_an_expected_hash_any_contract_is_accepted():
    message = report_to_message(DataReport(3, {}, 0, 0, {}, "ef" * 32))

    assert report_from_message(message).num_examples == 3
