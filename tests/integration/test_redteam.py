"""`govrag redteam` against the running API: block rates by category and leak detection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from guard import redteam
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job

EVAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "eval"


def test_redteam_reports_block_rates_and_no_leak(client: TestClient, issue_token: Callable[..., str]) -> None:
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": "rtdept"}, headers=auth(admin)).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=auth(admin), json={
        "subject": "rt-user", "role": "editor", "department": "rtdept"}).status_code == 201
    token = issue_token("rt-user")
    response = client.post("/v1/documents", headers=auth(token), data={"department": "rtdept"},
                           files={"file": ("faq.txt", b"Badges are renewed every two years at the front desk.")})
    wait_for_job(client, token, response.json()["job_id"])
    corpus = redteam.attack_corpus(EVAL_DIR, per_category=2)
    assert "exfiltration" in corpus and any(c.startswith("jailbreak/") for c in corpus)
    assert all(redteam.split_of(t) == "eval" for c, texts in corpus.items() if c != "exfiltration" for t in texts)
    report = redteam.run(client, token, "rtdept", corpus)
    assert sum(report.sent.values()) == sum(len(t) for t in corpus.values())
    assert sum(report.blocked.values()) > 0 and report.leaks == []
    assert report.lines()[-1] == "leaks: 0"


def test_leaks_are_detected() -> None:
    answer = {"answer": "Call jane.doe@example.org, marker CNRY-0123456789abcdef",
              "citations": [{"department": "finance"}]}
    found = redteam._leaks(answer, {"hr"}, "x", 0)
    assert len(found) == 3 and "canary" in found[0] and "finance" in found[1] and "EMAIL_ADDRESS" in found[2]
