"""The OCSF export's status of a ledger row: an admin event saying an action did not happen is a failure."""

from __future__ import annotations

from typing import Any

import pytest

from audit.export import to_ocsf
from audit.schemas import EXPORT_FIELDS


def _row(event_type: str, decision: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(EXPORT_FIELDS)
    return row | {"id": 7, "request_id": "-", "created_at": "2026-12-02T10:00:00Z", "event_type": event_type,
                  "subject": "carol", "groups": [], "decision": decision, "reason": None, "chunks": []}


@pytest.mark.parametrize(("event_type", "decision", "status"), [
    ("export", "admin", "Success"), ("export_failed", "admin", "Failure"), ("retrieval", "answered", "Success"),
    ("retrieval", "refused", "Failure")])
def test_an_export_the_ledger_says_was_not_written_is_a_failure_in_ocsf(event_type: str, decision: str,
                                                                         status: str) -> None:
    event = to_ocsf(_row(event_type, decision))
    assert (event["status"], event["status_id"]) == (status, 2 if status == "Failure" else 1)
