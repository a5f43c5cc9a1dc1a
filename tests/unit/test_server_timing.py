"""With GOVRAG_SERVER_TIMING the traced stages report their durations in a Server-Timing header."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from core import migrate
from core.settings import Settings
from core.tracing import shutdown_tracing


def test_query_reports_stage_durations(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, admins=["admin"], broker_url="memory://", server_timing=True,
                        inprocess_worker=False)
    migrate.upgrade(settings.resolved_database_url)
    try:
        with TestClient(create_app(settings)) as client:
            token = client.app.state.dev_issuer.issue("alice", [])  # type: ignore[attr-defined]
            response = client.post("/v1/query", json={"question": "What is the leave policy?"},
                                   headers={"Authorization": f"Bearer {token}"})
    finally:
        shutdown_tracing()
    assert response.status_code == 200
    stages = dict(item.strip().split(";dur=") for item in response.headers["server-timing"].split(","))
    assert {"query", "authz", "guard", "audit"} <= set(stages)
    assert all(float(value) >= 0 for value in stages.values())
    assert "What" not in response.headers["server-timing"]
